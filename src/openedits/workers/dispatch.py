"""The Dispatcher seam, and the in-process dispatcher: an input stage, one worker per device
and an output stage, all threads of the API process, over the store as the queue."""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from openedits._logging import bind
from openedits.engines.base import Engine
from openedits.engines.registry import build_engine
from openedits.errors import EngineFailed
from openedits.records import failure_body
from openedits.retention import purge_when_due
from openedits.runtime import Runtime
from openedits.schemas import TaskState
from openedits.workers.events import TaskFinished
from openedits.workers.inputs import InputStage
from openedits.workers.leases import LeaseKeeper
from openedits.workers.runner import (
    FETCHED,
    Job,
    Outcome,
    conclude,
    deliver,
    execute,
    failed,
    run_task,
    started,
)

__all__ = ["Dispatcher", "InProcessDispatcher", "device_runtimes", "reap_expired"]

log = logging.getLogger(__name__)
# Results written behind at once, and waiting to be: past that the device waits, so a slow
# disk cannot pile up finished variants in memory.
_OUTPUT_THREADS, _OUTPUT_BACKLOG = 2, 2
_JOIN_SECONDS = 10.0


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

    def drain(self, grace_seconds: float) -> None:
        """Stop claiming at once; give running tasks up to `grace_seconds` to finish; then hand
        every task still held (running, or prepared but not started) back to pending at once,
        its attempt not counted, for another worker or the next start."""
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


def device_runtimes(rt: Runtime, engines: Sequence[Engine] | None = None) -> list[Runtime]:
    """A Runtime per device of OPENEDITS_DEVICE, each with its own engine copy (the first
    device's is `rt.engine`); just `[rt]` for a single device."""
    devices = rt.settings.devices
    if len(devices) == 1 and not engines:
        return [rt]
    if engines is not None and len(engines) != len(devices):
        raise ValueError(f"{len(engines)} engines given for {len(devices)} devices")
    runtimes = []
    for i, device in enumerate(devices):
        settings = rt.settings.model_copy(update={"device": device})
        if engines is not None:
            engine = engines[i]
        else:
            engine = rt.engine if i == 0 else build_engine(settings)
        runtimes.append(rt.for_device(settings, engine))
    return runtimes


class InProcessDispatcher:
    """The embedded default: threads in the API process take pending tasks from the store.

    Staged (the default): the input stage prepares tasks ahead (`InputStage`), one worker per
    device (`workers_per_device`) only runs the engine, and an output stage encodes and stores
    the results behind it, so the device takes the next prepared task at once. Never two jobs
    on one device worker at once. `staged=False` runs each task start to end on its worker
    (`run_task`), as a reference for benchmarks.

    The store is the queue, so a restart loses nothing: pending rows are still there, and
    rows a dead process held come back through the lease reaper.
    """

    name = "in-process"

    def __init__(
        self,
        rt: Runtime,
        *,
        threads: int | None = None,
        staged: bool = True,
        engines: Sequence[Engine] | None = None,
    ) -> None:
        self.rt = rt
        self.threads = threads or rt.settings.workers_per_device
        # One Runtime per device (OPENEDITS_DEVICE=cuda:0,cuda:1), each with its own engine
        # copy; they share the store, blobs and bus. `engines` gives the copies (tests).
        self.devices = device_runtimes(rt, engines)
        self.staged = staged
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []  # device workers and the reaper
        self._writers: list[threading.Thread] = []
        self._node = f"{os.getpid()}-{secrets.token_hex(3)}"
        self._leases = LeaseKeeper(rt, on_stop=self._left)
        self._inputs = self._new_inputs()
        self._outputs: queue.Queue[tuple[Job, Outcome | None] | None] = queue.Queue(
            _OUTPUT_BACKLOG
        )
        self._busy: dict[str, Job] = {}  # on a device or in the output stage
        self._busy_lock = threading.Condition()

    def _new_inputs(self) -> InputStage:
        s = self.rt.settings
        return InputStage(self.rt, self._leases, self._node, threads=s.input_threads,
                          per_owner=s.inputs_per_owner)

    # --- the Dispatcher protocol

    def start(self) -> None:
        """Reap leftovers from a previous life, then start the stages and the reaper."""
        self._stop.clear()
        self._threads, self._writers = [], []
        reap_expired(self.rt)
        self._leases.start()
        if self.staged:
            self._inputs = self._new_inputs()
            self._inputs.start()
            self._outputs = queue.Queue(_OUTPUT_BACKLOG)
            for i in range(_OUTPUT_THREADS):
                self._writers.append(self._spawn(self._write, f"openedits-results-{i}"))
        work = self._device if self.staged else self._sequential
        for d, device_rt in enumerate(self.devices):
            for i in range(self.threads):
                n = d * self.threads + i
                self._spawn(work, f"openedits-worker-{n}", f"{self._node}-w{n}", device_rt)
        self._spawn(self._reap, "openedits-reaper")

    def stop(self) -> None:
        """Stop claiming; tasks not yet on the device go back to pending at once, a running
        task gets a few seconds to finish (else it is reclaimed through its lease)."""
        self._halt()
        self._join(_JOIN_SECONDS)
        self._leases.stop()

    def submit(self, task_id: str, priority: int) -> None:
        """Wake an idle worker."""
        self._inputs.wake(priority)
        self._wake.set()

    def drain(self, grace_seconds: float) -> None:
        """Stop claiming at once; running tasks get up to `grace_seconds` to finish; those
        still running then, and those prepared but not started, go back to pending at once."""
        self._halt()
        deadline = time.monotonic() + max(0.0, grace_seconds)
        with self._busy_lock:
            self._busy_lock.wait_for(
                lambda: not self._busy, max(0.0, deadline - time.monotonic())
            )
            left = list(self._busy.values())
        for job in left:
            job.lost.set()  # the engine stops at its next step; its result is dropped
            self._release(job)
        self._join(_JOIN_SECONDS if not left else 1.0)
        self._leases.stop()

    # --- the parts

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True, name=name)
        t.start()
        if target != self._write:
            self._threads.append(t)
        return t

    def _halt(self) -> None:
        self._stop.set()
        self._wake.set()
        for job in self._inputs.halt():
            self._release(job)

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        # The device workers are done: the writers finish what is queued, then end.
        for _ in self._writers:
            try:
                self._outputs.put(None, timeout=max(0.1, deadline - time.monotonic()))
            except queue.Full:
                break
        for t in self._writers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def _release(self, job: Job) -> None:
        self._leases.drop(job)
        try:
            if self.rt.store.release(job.task_id, job.worker_id):
                log.info("task handed back to pending", extra={"task_id": job.task_id})
        except Exception:
            log.exception("releasing a task failed; its lease lapses",
                          extra={"task_id": job.task_id})

    def _left(self, job: Job) -> None:
        """A waiting job was cancelled or lost its lease: out of the input stage at once."""
        if self._inputs.discard(job):
            self._leases.drop(job)
            log.info("task left the queue (%s)", "lost" if job.lost.is_set() else "cancelled",
                     extra={"task_id": job.task_id})

    def _busy_add(self, job: Job) -> None:
        with self._busy_lock:
            self._busy[job.task_id] = job

    def _busy_done(self, job: Job) -> None:
        with self._busy_lock:
            self._busy.pop(job.task_id, None)
            self._busy_lock.notify_all()

    def _device(self, worker_id: str, device_rt: Runtime) -> None:
        """One device's worker: the engine only; inputs come prepared, results go behind."""
        while not self._stop.is_set():
            job = self._inputs.take(timeout=self.rt.settings.reaper_interval_seconds)
            if job is None:
                continue
            self._leases.unwatch(job)  # the runner polls its cancel flag from here on
            self._busy_add(job)
            with bind(task_id=job.task_id, trace_id=job.row.trace_id):
                outcome: Outcome | None = None
                try:
                    try:
                        began = self.rt.store.start(
                            job.task_id, job.worker_id, self.rt.settings.lease_seconds,
                            seeds=job.seeds, progress=FETCHED,
                        )
                    finally:
                        # Only now may an input thread refill the slot `take` freed: its
                        # reservation write would have delayed this start (measured: 4.2
                        # ms of a 5.2 ms gap between two edits on the device).
                        self._inputs.wake()
                    if began is None:
                        log.info("task no longer ours to start; dropped")
                        self._leases.drop(job)
                        self._busy_done(job)
                        continue
                    job.recorded = True
                    started(self.rt, job)
                    execute(device_rt, job)
                except Exception as exc:
                    outcome = failed(job, exc)
                if not self._inputs.held() and self._outputs.empty():
                    # No task is coming for the device: handing the results to another
                    # thread would only add a wake-up to this task's latency.
                    self._finish(job, outcome)
                    continue
            self._outputs.put((job, outcome))

    def _write(self) -> None:
        """The output stage: results encoded and stored, then the task's end written."""
        while True:
            item = self._outputs.get()
            if item is None:
                return
            job, outcome = item
            with bind(task_id=job.task_id, trace_id=job.row.trace_id):
                self._finish(job, outcome)

    def _finish(self, job: Job, outcome: Outcome | None) -> None:
        try:
            if outcome is None:
                try:
                    outcome = Outcome(TaskState.succeeded, deliver(self.rt, job))
                except Exception as exc:
                    outcome = failed(job, exc)
            self._leases.drop(job)
            if not job.lost.is_set():
                conclude(self.rt, job, outcome)
        except Exception:
            log.exception("writing a task's end failed; its lease lapses")
        finally:
            self._leases.drop(job)
            self._busy_done(job)

    def _sequential(self, worker_id: str, device_rt: Runtime) -> None:
        """Unstaged: claim, then run start to end on this thread."""
        while not self._stop.is_set():
            # Clear before claiming so a submit that lands after the claim still wakes us.
            self._wake.clear()
            try:
                row = self.rt.store.claim_next(worker_id, self.rt.settings.lease_seconds)
            except Exception:
                log.exception("claiming a task failed; retrying")
                self._stop.wait(1.0)
                continue
            if row is None:
                self._wake.wait(self.rt.settings.reaper_interval_seconds)
                continue
            try:
                run_task(device_rt, row.id, worker_id)
            except Exception:
                log.exception("run_task escaped", extra={"task_id": row.id})

    def _reap(self) -> None:
        next_purge = 0.0
        while True:
            next_purge = purge_when_due(self.rt, next_purge)
            if self._stop.wait(self.rt.settings.reaper_interval_seconds):
                return
            try:
                if reap_expired(self.rt):
                    self._inputs.wake(0)
                    self._wake.set()
            except Exception:
                log.exception("reaping expired leases failed")
