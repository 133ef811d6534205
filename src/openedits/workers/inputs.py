"""InputStage: claims tasks fairly and prepares their inputs ahead of the device, on threads
of its own, so a slow origin never holds the engine and one token cannot fill the stage."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from openedits._logging import bind
from openedits.errors import TaskCancelled
from openedits.runtime import Runtime
from openedits.workers.leases import LeaseKeeper
from openedits.workers.runner import Job, Outcome, conclude, failed, prepare

__all__ = ["InputStage"]

log = logging.getLogger(__name__)
# Seconds the device waits for a more urgent task whose inputs are still being prepared.
_URGENT_WAIT = 1.0
# How often the device looks in the store for a more urgent task it was not told of.
_LOOK_EVERY = 1.0
_NO_PRIORITY = 1 << 30


class _Wakes:
    """Wake-ups for the input threads, each taken by one of them.

    A wake that came while no thread waited is kept (up to one per thread), so none is lost
    between a claim that found nothing and the next wait. A submit wakes one idle thread: with
    an Event every thread woke and ran the claim query, four queries for one task, each
    competing with the running task for the CPU (measured: 12 claim queries per sync edit).
    """

    def __init__(self, threads: int) -> None:
        self._cond = threading.Condition()
        self._pending = 0
        self._cap = threads

    def set(self) -> None:
        """Wake one thread (now, or the next one that waits)."""
        with self._cond:
            self._pending = min(self._cap, self._pending + 1)
            self._cond.notify()

    def set_all(self) -> None:
        """Wake every thread (to stop)."""
        with self._cond:
            self._pending = self._cap
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        """Take a wake-up, waiting at most `timeout` seconds for one."""
        with self._cond:
            if not self._pending:
                self._cond.wait(timeout)
            self._pending = max(0, self._pending - 1)


class InputStage:
    """`threads` threads reserve pending tasks from the store (under a lease, so crash
    safety, cancel and the reaper work as for a running task), fetch, decode and validate their
    inputs, and keep them ready for the device, which `take`s the most urgent.

    At most `threads` tasks are held at once (reserved, preparing or ready), and at most
    `per_owner` of one owner's: five hanging URLs of one token occupy two threads, not all of
    them, and the claim order (see `TaskStore.reserve_next`) puts the owner with the fewest
    tasks held first. A held task that is cancelled, or whose lease is lost, leaves at once.
    """

    def __init__(
        self,
        rt: Runtime,
        leases: LeaseKeeper,
        node: str,
        *,
        threads: int,
        per_owner: int,
        on_free: Callable[[], None] | None = None,
    ) -> None:
        self.rt, self.leases, self.node = rt, leases, node
        self.threads, self.per_owner = threads, per_owner
        self._lock = threading.Condition()
        self._claim_lock = threading.Lock()
        self._wake = _Wakes(threads)
        self._halt = threading.Event()
        self._held: dict[str, Job] = {}
        self._owners: Counter[str] = Counter()
        self._ready: list[tuple[int, int, Job]] = []
        self._seq = itertools.count()
        self._workers: list[threading.Thread] = []
        self._on_free = on_free
        self._submitted = _NO_PRIORITY  # the most urgent priority submitted since a take
        self._looked = float("-inf")

    # --- life

    def start(self) -> None:
        """Start the input threads."""
        self._halt.clear()
        self._workers = []
        for i in range(self.threads):
            t = threading.Thread(target=self._work, args=(f"{self.node}-i{i}",), daemon=True,
                                 name=f"openedits-inputs-{i}")
            t.start()
            self._workers.append(t)

    def halt(self) -> list[Job]:
        """Stop claiming at once; returns the jobs held (reserved, preparing or ready), which
        are no longer handed to the device. Their threads drop them when their fetch ends."""
        self._halt.set()
        self._wake.set_all()
        with self._lock:
            jobs = list(self._held.values())
            self._held.clear()
            self._owners.clear()
            self._ready.clear()
            self._lock.notify_all()
        for job in jobs:
            job.lost.set()
        return jobs

    def join(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds each) for the input threads to end."""
        for t in self._workers:
            t.join(timeout=timeout)

    def wake(self, priority: int | None = None) -> None:
        """A task may be pending (of `priority`, when known): let an idle thread look."""
        if priority is not None:
            with self._lock:
                self._submitted = min(self._submitted, priority)
        self._wake.set()

    def _maybe_more_urgent(self, best: int) -> bool:
        """Whether the store may hold a pending task more urgent than `best`: one was
        submitted here since the last look, or the last look is a while ago (submits in other
        processes); saves the device a query per task."""
        with self._lock:
            hinted, self._submitted = self._submitted < best, _NO_PRIORITY
        now = time.monotonic()
        if hinted or now - self._looked >= _LOOK_EVERY:
            self._looked = now
            return True
        return False

    # --- the device's side

    def take(self, timeout: float) -> Job | None:
        """The most urgent ready job (priority, then the order it became ready in), or None
        after `timeout` seconds or once halted. It leaves the stage, freeing its slot; the caller
        calls `wake` once its own store write is done, and an input thread refills the slot.

        A more urgent task, pending in the store or still being prepared, is waited for,
        briefly (`_URGENT_WAIT`): long enough for ordinary inputs, too short for a hanging
        URL to hold the device."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._ready or self._halt.is_set(), timeout):
                return None
        urgent_until = time.monotonic() + _URGENT_WAIT
        look = None  # decided once per take: then looked at again until it is resolved
        while True:
            with self._lock:
                if not self._ready:
                    return None
                best = self._ready[0][0]
            if look is None:
                look = best > 0 and self._maybe_more_urgent(best)
            pending = self.rt.store.most_urgent_pending() if look and best > 0 else None
            with self._lock:
                if not self._ready:
                    return None
                best = self._ready[0][0]
                left = urgent_until - time.monotonic()
                wait = (pending is not None and pending < best) or self._more_urgent_preparing()
                if not wait or left <= 0 or self._halt.is_set():
                    _, _, job = heapq.heappop(self._ready)
                    self._release_slot(job)
                    break
                self._wake.set()  # an input thread reserves the urgent one
                self._lock.wait(min(left, 0.05))
        # The freed slot is refilled when the caller says (`wake`), not here: a reservation
        # written now would compete with the device's own start write for the store.
        return job

    def _more_urgent_preparing(self) -> bool:
        ready = {id(e[2]) for e in self._ready}
        best = self._ready[0][0]
        return any(j.row.priority < best for j in self._held.values() if id(j) not in ready)

    def discard(self, job: Job) -> bool:
        """Take a held job out of the stage (it was cancelled or lost); False if the device
        already has it, or it had already left."""
        with self._lock:
            if self._held.get(job.task_id) is not job:
                return False
            self._ready = [e for e in self._ready if e[2] is not job]
            heapq.heapify(self._ready)
            self._release_slot(job)
        self._wake.set()
        return True

    def held(self) -> list[Job]:
        """The jobs the stage holds now."""
        with self._lock:
            return list(self._held.values())

    def _release_slot(self, job: Job) -> None:
        if self._held.pop(job.task_id, None) is not None:
            self._owners[job.row.owner] -= 1
            if self._owners[job.row.owner] <= 0:
                del self._owners[job.row.owner]
        if self._on_free is not None:
            self._on_free()

    # --- the threads

    def _claim(self, worker_id: str) -> Job | None:
        # One claim at a time in this process, so the per-owner count it skips by is exact.
        with self._claim_lock:
            with self._lock:
                count = len(self._held)
                worst = max((j.row.priority for j in self._held.values()), default=0)
                full = {o for o, n in self._owners.items() if n >= self.per_owner}
            lease = self.rt.settings.lease_seconds
            row = None
            if count < self.threads:
                row = self.rt.store.reserve_next(worker_id, lease, skip_owners=full)
            if row is None and worst > 0 and count < 2 * self.threads:
                # Full, or the owner at its cap: a task more urgent than one already held may
                # still come in (up to twice the threads), so turbo never waits behind relax.
                row = self.rt.store.reserve_next(worker_id, lease, below_priority=worst)
            if row is None:
                return None
            job = Job(row, worker_id)
            with self._lock:
                if self._halt.is_set():
                    self.rt.store.release(row.id, worker_id)
                    return None
                self._held[row.id] = job
                self._owners[row.owner] += 1
            self.leases.hold(job, watch=True)
            return job

    def _work(self, worker_id: str) -> None:
        while not self._halt.is_set():
            try:
                job = self._claim(worker_id)
            except Exception:
                log.exception("claiming a task failed; retrying")
                self._halt.wait(1.0)
                continue
            if job is None:
                self._wake.wait(self.rt.settings.reaper_interval_seconds)
                continue
            with bind(task_id=job.task_id, trace_id=job.row.trace_id):
                self._prepare(job)

    def _prepare(self, job: Job) -> None:
        try:
            prepare(self.rt, job)
            if job.cancelled.is_set():
                raise TaskCancelled("the task was cancelled")
        except Exception as exc:
            # Refused inputs end the task here: it never reaches the device.
            if self.discard(job):
                self.leases.drop(job)
                if not job.lost.is_set():
                    self._end(job, failed(job, exc))
            return
        with self._lock:
            if self._held.get(job.task_id) is not job:
                # Cancelled, lost or halted while its inputs were fetched.
                self.leases.drop(job)
                return
            heapq.heappush(self._ready, (job.row.priority, next(self._seq), job))
            self._lock.notify_all()

    def _end(self, job: Job, outcome: Outcome) -> None:
        try:
            conclude(self.rt, job, outcome)
        except Exception:
            log.exception("ending a task whose inputs failed did not work; its lease lapses")
