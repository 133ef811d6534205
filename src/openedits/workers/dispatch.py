"""The Dispatcher seam, and the in-process dispatcher: worker threads that claim from the store."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Protocol

from openedits.errors import EngineFailed
from openedits.records import failure_body
from openedits.retention import purge_expired
from openedits.runtime import Runtime
from openedits.schemas import TaskState
from openedits.workers.events import TaskFinished
from openedits.workers.runner import run_task

__all__ = ["Dispatcher", "InProcessDispatcher", "reap_expired"]

log = logging.getLogger(__name__)
# Retention is counted in days; looking once an hour is plenty.
_PURGE_EVERY = 3600.0


class Dispatcher(Protocol):
    """Gets accepted tasks to workers."""

    def start(self) -> None:
        """Begin taking work."""
        ...

    def stop(self) -> None:
        """Stop taking work and wait (briefly) for running tasks."""
        ...

    def submit(self, task_id: str, priority: int) -> None:
        """A pending task is in the store; make sure a worker will run it."""
        ...


def reap_expired(rt: Runtime, on_requeued: Callable[[str], None] | None = None) -> int:
    """Requeue tasks whose worker died; fail those that used up their attempts. Returns how
    many tasks it touched. `on_requeued` hears each requeued id (a broker re-publishes it)."""
    requeued, exhausted = rt.store.requeue_expired(rt.settings.max_attempts)
    for task_id in requeued:
        log.warning(
            "task requeued: its worker stopped renewing the lease", extra={"task_id": task_id}
        )
        if on_requeued is not None:
            on_requeued(task_id)
    for task_id in exhausted:
        row = rt.store.get(task_id)
        if row is None:
            continue
        error = EngineFailed(
            f"the task's worker stopped {row.attempts} times while running it; "
            "it was given up (the input may crash the engine)"
        )
        body = failure_body(task_id, row.trace_id, error)
        if rt.store.fail_expired(task_id, body, error.status_code):
            rt.bus.publish(TaskFinished(task_id, TaskState.failed))
    return len(requeued) + len(exhausted)


class InProcessDispatcher:
    """The embedded default: threads in the API process claim pending tasks from the store.

    The store is the queue, so a restart loses nothing: pending rows are still there, and
    rows left running by a dead process come back through the lease reaper.
    """

    name = "in-process"

    def __init__(self, rt: Runtime, *, threads: int | None = None) -> None:
        self.rt = rt
        self.threads = threads or rt.settings.workers_per_device
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._node = f"{os.getpid()}-{secrets.token_hex(3)}"

    def start(self) -> None:
        """Reap leftovers from a previous life, then start the workers and the reaper."""
        self._stop.clear()
        self._workers = []
        reap_expired(self.rt)
        for i in range(self.threads):
            t = threading.Thread(target=self._work, args=(f"{self._node}-w{i}",), daemon=True,
                                 name=f"openedits-worker-{i}")
            t.start()
            self._workers.append(t)
        reaper = threading.Thread(target=self._reap, daemon=True, name="openedits-reaper")
        reaper.start()
        self._workers.append(reaper)

    def stop(self) -> None:
        """Stop claiming; a running task finishes or is reclaimed after restart via its lease."""
        self._stop.set()
        self._wake.set()
        for t in self._workers:
            t.join(timeout=10)

    def submit(self, task_id: str, priority: int) -> None:
        """Wake an idle worker."""
        self._wake.set()

    def _work(self, worker_id: str) -> None:
        lease = self.rt.settings.lease_seconds
        while not self._stop.is_set():
            # Clear before claiming so a submit that lands after the claim still wakes us.
            self._wake.clear()
            try:
                row = self.rt.store.claim_next(worker_id, lease)
            except Exception:
                log.exception("claiming a task failed; retrying")
                self._stop.wait(1.0)
                continue
            if row is None:
                self._wake.wait(self.rt.settings.reaper_interval_seconds)
                continue
            try:
                run_task(self.rt, row.id, worker_id)
            except Exception:
                log.exception("run_task escaped", extra={"task_id": row.id})

    def _reap(self) -> None:
        next_purge = 0.0
        while True:
            now = time.monotonic()
            if now >= next_purge:
                next_purge = now + _PURGE_EVERY
                try:
                    purge_expired(self.rt)
                except Exception:
                    log.exception("purging expired tasks failed")
            if self._stop.wait(self.rt.settings.reaper_interval_seconds):
                return
            try:
                if reap_expired(self.rt):
                    self._wake.set()
            except Exception:
                log.exception("reaping expired leases failed")
