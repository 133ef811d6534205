"""Typed task events and the in-process bus that carries them from runner to listeners."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from openedits.schemas import TaskState

__all__ = ["EventBus", "TaskEvent", "TaskFinished", "TaskProgress", "TaskStarted", "TaskWatch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskStarted:
    """A worker claimed the task and began."""

    task_id: str


@dataclass(frozen=True)
class TaskProgress:
    """The task's progress rose (0..99)."""

    task_id: str
    progress: int


@dataclass(frozen=True)
class TaskFinished:
    """The task ended; its row holds the result. `timings`: seconds per phase (queue, inputs,
    engine, results, total) when a worker ended it, None when it ended otherwise (a cancel
    before it ran, a given-up task)."""

    task_id: str
    state: TaskState
    timings: dict[str, float] | None = None


TaskEvent = TaskStarted | TaskProgress | TaskFinished
Listener = Callable[[TaskEvent], None]


class TaskWatch:
    """An asyncio view of one task's events, fed from worker threads."""

    def __init__(self, bus: EventBus, task_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self._bus = bus
        self.task_id = task_id
        self._loop = loop
        self.queue: asyncio.Queue[TaskEvent] = asyncio.Queue()

    def _deliver(self, event: TaskEvent) -> None:
        # The waiting request's loop may have closed (client gone); nothing to tell it then.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next(self, timeout: float) -> TaskEvent | None:
        """The next event, or None after `timeout` seconds (the caller then re-reads the store)."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        """Stop receiving events."""
        self._bus._unwatch(self)

    def __enter__(self) -> TaskWatch:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class EventBus:
    """Publish/subscribe within one process. Listeners run on the publishing thread, so they
    must be quick; anything slow hands off to its own thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._watches: dict[str, set[TaskWatch]] = {}

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` with every event."""
        with self._lock:
            self._listeners.append(listener)

    def watch(self, task_id: str) -> TaskWatch:
        """Start receiving one task's events on the running asyncio loop."""
        w = TaskWatch(self, task_id, asyncio.get_running_loop())
        with self._lock:
            self._watches.setdefault(task_id, set()).add(w)
        return w

    def _unwatch(self, w: TaskWatch) -> None:
        with self._lock:
            group = self._watches.get(w.task_id)
            if group is not None:
                group.discard(w)
                if not group:
                    del self._watches[w.task_id]

    def publish(self, event: TaskEvent) -> None:
        """Hand `event` to every listener and to the task's watchers."""
        with self._lock:
            listeners = list(self._listeners)
            watches = list(self._watches.get(event.task_id, ()))
        for w in watches:
            w._deliver(event)
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed on %s", event)
