"""run_task: the one function that executes a claimed task, and the phases it is made of.

A task runs in four phases, each a function of a `Job`: `prepare` (the inputs: fetch, decode,
validate), `execute` (the engine, on the device), `deliver` (the results: composite, encode,
store the files) and `conclude` (the guarded end write and its event). `run_task` runs them
one after the other; the in-process dispatcher runs them as stages on their own threads, so
the device never waits for another task's inputs or results. Either way the same code runs.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from openedits._ids import new_image_id
from openedits._logging import bind
from openedits.engines.base import Preset, collecting_notes
from openedits.errors import EngineFailed, OpenEditsError, TaskCancelled
from openedits.imaging.decode import decode_image
from openedits.imaging.encode import encode_results
from openedits.imaging.mask import composite, decode_mask, kept_outside
from openedits.records import failure_body
from openedits.runtime import Runtime
from openedits.schemas import EditCreate, EditResult, TaskState
from openedits.store.tasks import TaskRow
from openedits.workers.events import TaskFinished, TaskProgress, TaskStarted
from openedits.workers.leases import LeaseKeeper

__all__ = [
    "FETCHED",
    "VARIANTS",
    "Job",
    "Outcome",
    "conclude",
    "deliver",
    "execute",
    "failed",
    "prepare",
    "run_task",
    "started",
]

log = logging.getLogger(__name__)
VARIANTS = 4
# Progress bands: fetching and decoding take the first 5%, saving the last 5%.
FETCHED, _EDITED = 5, 95
# Seconds between progress writes to the store, and between reads of the cancel flag.
_STORE_EVERY, _CANCEL_EVERY = 0.5, 0.2


@dataclass(eq=False)
class Job:
    """A task a worker holds under its lease, on its way through the phases."""

    row: TaskRow
    worker_id: str
    # Set when the lease is gone (the task was requeued, ended elsewhere, or released by a
    # drain): whatever this worker does with it from then on is dropped.
    lost: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Seconds per phase (inputs, engine, results); queue and total are added at the end.
    timings: dict[str, float] = field(default_factory=dict)
    body: EditCreate | None = None
    image: Image.Image | None = None
    mask: Image.Image | None = None
    variants: list[Image.Image] | None = None
    seeds: list[int] | None = None
    # What the engine did differently for this task (engines.base.add_note), for the record.
    notes: list[str] = field(default_factory=list)
    # True once the store holds the seeds and the first progress (written with the start).
    recorded: bool = False

    @property
    def task_id(self) -> str:
        """The task's id."""
        return self.row.id

    def should_stop(self) -> bool:
        """True once the task was cancelled or this worker lost it."""
        return self.lost.is_set() or self.cancelled.is_set()


@dataclass(frozen=True)
class Outcome:
    """How a task ended: its terminal state, the body to keep, the HTTP status of a failure."""

    state: TaskState
    response: dict[str, Any]
    error_status: int | None = None


def failed(job: Job, exc: BaseException) -> Outcome:
    """The outcome of a phase that raised: cancelled, failed with the error's own message, or
    (for anything not an openedits error) failed with a message that never leaks internals."""
    row = job.row
    if isinstance(exc, TaskCancelled):
        return Outcome(TaskState.cancelled, failure_body(row.id, row.trace_id, exc),
                       exc.status_code)
    if isinstance(exc, OpenEditsError):
        log.info("task failed: %s: %s", exc.code, exc.message)
        return Outcome(TaskState.failed, failure_body(row.id, row.trace_id, exc),
                       exc.status_code)
    log.error("task crashed", exc_info=exc)
    error = EngineFailed(
        f"the edit failed inside the server ({type(exc).__name__}); "
        f"quote trace_id {row.trace_id} when reporting it"
    )
    return Outcome(TaskState.failed, failure_body(row.id, row.trace_id, error),
                   error.status_code)


def started(rt: Runtime, job: Job) -> None:
    """Tell listeners the task began running."""
    log.info("task started")
    rt.bus.publish(TaskStarted(job.task_id))


def prepare(rt: Runtime, job: Job) -> None:
    """The inputs: read the submit body, fetch and decode the image and mask, and let the
    engine refuse what it cannot edit, all before the task reaches the device."""
    t0 = time.perf_counter()
    try:
        payload = rt.store.payload(job.task_id)
        if payload is None:
            raise EngineFailed(f"the inputs of task {job.task_id} are gone; submit it again")
        body = EditCreate.model_validate(payload)
        s = rt.settings
        raw = rt.fetcher.fetch(body.image_url, field="image_url")
        decoded = decode_image(
            raw, field="image_url", max_pixels=s.max_image_pixels, max_side=s.max_side
        )
        mask = None
        if body.mask is not None:
            mask_bytes = rt.fetcher.fetch(body.mask, field="mask", allow_bare_base64=True)
            mask = decode_mask(
                mask_bytes, decoded.image.size, field="mask", max_pixels=s.max_image_pixels
            )
        rt.engine.validate(decoded.image, mask, body.prompt)
        job.body, job.image, job.mask = body, decoded.image, mask
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        job.seeds = [seed + i for i in range(VARIANTS)]
    finally:
        job.timings["inputs"] = time.perf_counter() - t0


def execute(rt: Runtime, job: Job) -> None:
    """The engine: four variants of the prepared inputs, with progress and cancel checks."""
    assert job.body is not None and job.image is not None
    body, row, worker_id = job.body, job.row, job.worker_id
    # The bus hears every progress change (streams and sync waiters want them at once); the
    # store gets at most one write per interval, and the cancel flag at most one read, so a
    # fast engine's steps are not paced by the database.
    clock = time.monotonic
    seen = {"progress": -1, "written": float("-inf"), "checked": float("-inf")}
    if job.recorded:
        # The start wrote the first progress and read nothing new to cancel a moment ago.
        seen["written"] = seen["checked"] = clock()

    def on_progress(fraction: float) -> None:
        progress = FETCHED + int(max(0.0, min(1.0, fraction)) * (_EDITED - FETCHED))
        if progress <= seen["progress"]:
            return
        seen["progress"] = progress
        rt.bus.publish(TaskProgress(row.id, progress))
        if clock() - seen["written"] >= _STORE_EVERY:
            seen["written"] = clock()
            rt.store.set_progress(row.id, worker_id, progress, rt.settings.lease_seconds)

    def should_cancel(force: bool = False) -> bool:
        if job.should_stop():
            return True
        if force or clock() - seen["checked"] >= _CANCEL_EVERY:
            seen["checked"] = clock()
            if rt.store.cancel_requested(row.id):
                job.cancelled.set()
        return job.should_stop()

    t0 = time.perf_counter()
    try:
        assert job.seeds is not None
        on_progress(0.0)
        if not job.recorded:
            rt.store.set_seeds(row.id, worker_id, job.seeds)
        preset: Preset = body.mode
        if should_cancel(force=not job.recorded):
            raise TaskCancelled("the task was cancelled")
        # Engines that own a device serialise their jobs on it themselves (diffusers waits for
        # its device in slices, so a queued task can still be cancelled); opencv needs none.
        rt.engine.load(rt.settings.device)
        with collecting_notes() as notes:
            try:
                variants = rt.engine.edit(
                    job.image,
                    job.mask,
                    body.prompt,
                    n=VARIANTS,
                    seed=job.seeds[0],
                    preset=preset,
                    on_progress=on_progress,
                    should_cancel=should_cancel,
                )
            finally:
                job.notes.extend(notes)
        if len(variants) != VARIANTS:
            raise EngineFailed(
                f"engine {rt.engine.name} returned {len(variants)} variants, not {VARIANTS}"
            )
        job.variants = variants
    finally:
        job.timings["engine"] = time.perf_counter() - t0


def _kept_outside_mask(
    image: Image.Image, variants: list[Image.Image], mask: Image.Image | None, pool: Executor
) -> list[np.ndarray]:
    """The variants with every pixel outside the mask set back to the input's, as the
    contract promises whatever the engine did (arrays, ready for the encoder)."""
    if mask is None or mask.size != image.size or image.mode != "RGB":
        return [np.asarray(composite(image, v, mask).convert("RGB")) for v in variants]
    # An engine that returned another size or mode is fitted by composite first.
    fitted = [v if v.size == image.size and v.mode == "RGB" else composite(image, v, mask)
              for v in variants]
    return kept_outside(np.asarray(image), fitted, mask, mapper=pool.map)


def deliver(rt: Runtime, job: Job) -> dict[str, Any]:
    """The results: outside-mask pixels restored, the grid and the variants encoded and
    stored; returns the result body."""
    assert job.body is not None and job.image is not None and job.variants is not None
    body, row = job.body, job.row
    t0 = time.perf_counter()
    try:
        # A cancel that arrived during the engine's last step (or while the results waited
        # for the output stage) still wins over the result. Read here, not on the device.
        if job.should_stop() or rt.store.cancel_requested(row.id):
            raise TaskCancelled("the task was cancelled")
        variants = _kept_outside_mask(job.image, job.variants, job.mask, rt.encoder)
        files = encode_results(
            variants,
            fmt=body.output_format,
            quality=body.output_quality,
            # Variants nobody links need no file of their own.
            singles=body.split_images,
            pool=rt.encoder,
        )
        # The files are written side by side: a write and its rename wait on the disk, and a
        # put to an object store is a network round trip.
        written = [(f"{row.id}/{name}", data, ctype) for name, data, ctype in files.singles]
        written.append((f"{row.id}/{files.grid[0]}", files.grid[1], files.grid[2]))
        list(rt.encoder.map(lambda f: rt.blobs.put(*f), written))
        urls = [rt.blobs.url(key, row.base_url) for key, _, _ in written]
        grid_url = urls.pop()
        width, height = files.grid_size
        result = EditResult(
            task_id=row.id,
            image_id=new_image_id(),
            image_url=grid_url,
            image_width=width,
            image_height=height,
            raw_image_url=grid_url,
            raw_image_width=width,
            raw_image_height=height,
            sub_image_urls=urls,
            progress=100,
            actions=[],
        )
        return result.model_dump()
    finally:
        job.timings["results"] = time.perf_counter() - t0


def conclude(rt: Runtime, job: Job, outcome: Outcome) -> TaskState | None:
    """The guarded end write (with the task's timings) and its event. Returns the final
    state, or None when the task was no longer this worker's to end."""
    timings = dict(job.timings)
    total = max(0.0, rt.clock() - job.row.created_at)
    # Every second not spent on a phase was spent waiting: for a worker, for the device, or
    # for the output stage.
    timings["queue"] = max(0.0, total - sum(timings.values()))
    timings["total"] = total
    timings = {k: round(v, 4) for k, v in timings.items()}
    finished = rt.store.finish(
        job.task_id,
        outcome.state,
        outcome.response,
        error_status=outcome.error_status,
        worker_id=job.worker_id,
        timings=timings,
        notes=job.notes or None,
    )
    if not finished:
        # Cancelled (or requeued) while we worked: the earlier decision stands.
        current = rt.store.get(job.task_id)
        log.info("task result dropped; task is %s", current and current.state.value)
        return None
    log.info(
        "task %s in %.0f ms: queue %.0f, inputs %.0f, engine %.0f, results %.0f",
        outcome.state.value,
        *(timings.get(k, 0.0) * 1000 for k in ("total", "queue", "inputs", "engine", "results")),
    )
    rt.bus.publish(TaskFinished(job.task_id, outcome.state, timings))
    return outcome.state


def run_task(rt: Runtime, task_id: str, worker_id: str) -> TaskState | None:
    """Execute a task this worker has claimed (running, leased to `worker_id`), and record
    how it ended.

    Every failure ends the task (failed or cancelled) instead of escaping: a broken engine
    or a hostile input must never take the worker down. Returns the final state, or None
    when the task was no longer this worker's to finish.
    """
    row = rt.store.get(task_id)
    if row is None or row.state is not TaskState.running or row.lease_owner != worker_id:
        return None
    job = Job(row, worker_id)
    with bind(task_id=task_id, trace_id=row.trace_id), LeaseKeeper(rt) as leases:
        started(rt, job)
        leases.hold(job)
        try:
            prepare(rt, job)
            execute(rt, job)
            outcome = Outcome(TaskState.succeeded, deliver(rt, job))
        except Exception as exc:
            outcome = failed(job, exc)
        finally:
            leases.drop(job)
        return conclude(rt, job, outcome)
