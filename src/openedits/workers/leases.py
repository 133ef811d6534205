"""LeaseKeeper: one thread that keeps the leases of every task a worker holds alive, and
notices at once when a task that waits (in a queue, not yet on the device) is cancelled."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from openedits.runtime import Runtime

if TYPE_CHECKING:
    from openedits.workers.runner import Job

__all__ = ["LeaseKeeper"]

log = logging.getLogger(__name__)
# How often waiting tasks' cancel flags are read: a cancelled task leaves its queue within this.
_WATCH_EVERY = 0.2


class LeaseKeeper:
    """Beats the lease of every held job every lease/3 seconds; a beat that fails (the task
    was requeued, ended or released) marks the job lost. Jobs held with `watch=True` also have
    their cancel flags read every 0.2 s (one query for all), and `on_stop(job)` is called when
    one is cancelled or lost, so the holder can take it out of its queue at once."""

    def __init__(self, rt: Runtime, on_stop: Callable[[Job], None] | None = None) -> None:
        self.rt = rt
        self.on_stop = on_stop
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._watched: set[str] = set()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start beating."""
        self._halt.clear()
        self._thread = threading.Thread(target=self._run, name="openedits-leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating (held leases then lapse unless their jobs end first)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LeaseKeeper:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def hold(self, job: Job, *, watch: bool = False) -> None:
        """Keep `job`'s lease alive until `drop`; with `watch`, also watch for its cancel."""
        with self._lock:
            self._jobs[job.task_id] = job
            if watch:
                self._watched.add(job.task_id)

    def unwatch(self, job: Job) -> None:
        """Stop watching `job`'s cancel flag (the runner polls it itself while it runs)."""
        with self._lock:
            self._watched.discard(job.task_id)

    def drop(self, job: Job) -> None:
        """Stop keeping `job`'s lease."""
        with self._lock:
            if self._jobs.get(job.task_id) is job:
                del self._jobs[job.task_id]
            self._watched.discard(job.task_id)

    def held(self) -> list[Job]:
        """The jobs held now."""
        with self._lock:
            return list(self._jobs.values())

    def _run(self) -> None:
        beat_every = self.rt.settings.lease_seconds / 3
        ticks = max(1, round(beat_every / _WATCH_EVERY))
        tick = 0
        while not self._halt.wait(min(_WATCH_EVERY, beat_every)):
            tick += 1
            try:
                self._watch()
                if tick % ticks == 0:
                    self._beat()
            except Exception:
                log.exception("keeping leases failed; retrying")

    def _watch(self) -> None:
        with self._lock:
            watched = {t: self._jobs[t] for t in self._watched if t in self._jobs}
        if not watched:
            return
        for task_id in self.rt.store.cancels_requested(list(watched)):
            job = watched[task_id]
            job.cancelled.set()
            self._stopped(job)

    def _beat(self) -> None:
        lease = self.rt.settings.lease_seconds
        for job in self.held():
            if job.lost.is_set():
                continue
            if not self.rt.store.heartbeat(job.task_id, job.worker_id, lease):
                job.lost.set()
                self._stopped(job)

    def _stopped(self, job: Job) -> None:
        with self._lock:
            watching = job.task_id in self._watched
        if watching and self.on_stop is not None:
            self.on_stop(job)
