"""CeleryDispatcher: an API node's dispatcher; publishes task ids to Celery workers over Redis.

No task is ever lost to the broker. The row commits before its id is published; a publish that
fails is retried; and the reaper, every `OPENEDITS_REAPER_INTERVAL_SECONDS`, re-publishes:

- tasks whose worker died (their lease ran out; they go back to pending and out again),
- every pending task when the broker comes back empty (Redis restarted without its data: a
  marker key this dispatcher sets is gone),
- pending tasks older than a few intervals while the broker's queue is empty (a message lost
  any other way, such as a node dying between its commit and its publish).

A duplicate message costs a worker one failed claim, nothing more.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

from openedits.retention import purge_when_due
from openedits.runtime import Runtime
from openedits.workers.celery_app import QUEUE, TASK_NAME, make_celery
from openedits.workers.dispatch import reap_expired
from openedits.workers.redis_bus import RedisEventBus

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["BROKER_MARKER", "CeleryDispatcher"]

log = logging.getLogger(__name__)

BROKER_MARKER = "openedits:broker-marker"
"""Set in the broker's Redis by the first dispatcher that sees it empty; its absence means the
broker lost its data, and with it the queued messages."""
# A pending task this many reaper intervals old, with the queue empty, lost its message.
_STALE_INTERVALS = 3
# After a failed publish, submits skip the broker this long (their ids wait for the reaper), so
# a broker that is down costs each submit nothing rather than a connect timeout.
_BACKOFF = 2.0


class CeleryDispatcher:
    """Publishes each accepted task's id to the broker and keeps the broker in step with the
    store (see the module docstring). Runs no task itself."""

    name = "celery"

    def __init__(self, rt: Runtime, *, app: Celery | None = None) -> None:
        if not rt.settings.broker_url:
            raise ValueError("CeleryDispatcher needs OPENEDITS_BROKER_URL")
        self.rt = rt
        self.app = app or make_celery(rt.settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._unsent: dict[str, int] = {}
        self._redis: Any = None
        self._quiet_until = 0.0

    # --- the Dispatcher protocol

    def start(self) -> None:
        """Listen for workers' events and start the reaper."""
        if isinstance(self.rt.bus, RedisEventBus):
            self.rt.bus.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._reap, name="openedits-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the reaper and the event listener; workers carry on with their tasks."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if isinstance(self.rt.bus, RedisEventBus):
            self.rt.bus.stop()

    def drain(self, grace_seconds: float) -> None:
        """An API node consumes no tasks, so there is nothing to finish or release: its
        accepted tasks are in the store and the broker, and run on the workers whatever this
        node does next. Workers drain on SIGTERM (Celery's warm shutdown)."""
        self.stop()

    def submit(self, task_id: str, priority: int) -> None:
        """Publish the task id (the row is committed). A failure is kept and retried by the
        reaper; the task is accepted either way, since the store holds it."""
        if time.monotonic() < self._quiet_until or not self._publish(task_id, priority):
            with self._lock:
                self._unsent[task_id] = priority

    def ready(self) -> str | None:
        """None when the broker answers; else a sentence saying it does not (readiness)."""
        try:
            self._client().ping()
        except Exception as exc:
            return f"the broker (OPENEDITS_BROKER_URL) does not answer: {type(exc).__name__}"
        return None

    # --- publishing

    def _publish(self, task_id: str, priority: int) -> bool:
        try:
            self.app.send_task(
                TASK_NAME,
                args=[task_id],
                queue=QUEUE,
                priority=priority,
                ignore_result=True,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
            )
        except Exception as exc:
            self._quiet_until = time.monotonic() + _BACKOFF
            log.warning("publishing a task to the broker failed (%s); the reaper retries",
                        exc, extra={"task_id": task_id})
            return False
        self._quiet_until = 0.0  # the broker answers again
        return True

    def _republish(self, found: list[tuple[str, int]], why: str) -> None:
        if found:
            log.warning("re-publishing %d pending tasks: %s", len(found), why)
        for task_id, priority in found:
            self.submit(task_id, priority)

    def _client(self) -> Any:
        if self._redis is None:
            import redis

            assert self.rt.settings.broker_url is not None
            self._redis = redis.Redis.from_url(
                self.rt.settings.broker_url, socket_timeout=2, socket_connect_timeout=2
            )
        return self._redis

    def queue_size(self) -> int:
        """Messages waiting in the broker (all priorities)."""
        with self.app.connection_for_write() as conn:
            declared = conn.default_channel.queue_declare(QUEUE, passive=False)
            return int(declared.message_count)

    # --- the reaper

    def reap_once(self) -> None:
        """One pass: requeue dead workers' tasks, retry failed publishes, and re-publish what
        a broker lost."""
        store = self.rt.store

        def republish_requeued(task_id: str) -> None:
            row = store.get(task_id)
            if row is not None:
                self.submit(task_id, row.priority)

        reap_expired(self.rt, on_requeued=republish_requeued)
        with self._lock:
            unsent, self._unsent = self._unsent, {}
        for task_id, priority in list(unsent.items()):
            # Straight to the broker: the reaper is where the back-off ends.
            if not self._publish(task_id, priority):
                with self._lock:
                    self._unsent.update(unsent)
                break
            del unsent[task_id]
        now = self.rt.clock()
        if self._client().set(BROKER_MARKER, secrets.token_hex(8), nx=True):
            # First start against this broker, or it came back empty: whatever it held is gone.
            self._republish(store.pending(created_before=now + 1), "the broker holds no marker "
                            "(first start, or Redis restarted empty)")
            return
        stale = now - _STALE_INTERVALS * self.rt.settings.reaper_interval_seconds
        waiting = store.pending(created_before=stale)
        if waiting and self.queue_size() == 0:
            self._republish(waiting, "they wait but the broker's queue is empty")

    def _reap(self) -> None:
        next_purge = 0.0
        interval = self.rt.settings.reaper_interval_seconds
        while not self._stop.is_set():
            next_purge = purge_when_due(self.rt, next_purge)
            try:
                self.reap_once()
            except Exception as exc:
                log.warning("reaper pass failed (%s); retrying in %g s", exc, interval)
            self._stop.wait(interval)
