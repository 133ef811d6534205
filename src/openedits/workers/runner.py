"""run_task: the one function that executes a claimed task, whichever dispatcher claimed it."""

from __future__ import annotations

import io
import logging
import secrets
import threading
import time
from typing import Any

from PIL import Image

from openedits._ids import new_image_id
from openedits._logging import bind
from openedits.engines.base import Preset
from openedits.errors import EngineFailed, OpenEditsError, TaskCancelled
from openedits.imaging.decode import decode_image
from openedits.imaging.grid import make_grid
from openedits.imaging.mask import composite, decode_mask
from openedits.records import failure_body
from openedits.runtime import Runtime
from openedits.schemas import EditCreate, EditResult, TaskState
from openedits.store.tasks import TaskRow
from openedits.workers.events import TaskFinished, TaskProgress, TaskStarted

__all__ = ["VARIANTS", "run_task"]

log = logging.getLogger(__name__)
VARIANTS = 4
# Progress bands: fetching and decoding take the first 5%, saving the last 5%.
_FETCHED, _EDITED = 5, 95
# Seconds between progress writes to the store, and between reads of the cancel flag.
_STORE_EVERY, _CANCEL_EVERY = 0.5, 0.2


class _Lease:
    """Keeps a running task's lease alive from a side thread, and notices when it is lost
    (the task was cancelled, or requeued because this worker looked dead)."""

    def __init__(self, rt: Runtime, task_id: str, worker_id: str) -> None:
        self.rt, self.task_id, self.worker_id = rt, task_id, worker_id
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{task_id[:8]}", daemon=True)

    def _beat(self) -> None:
        interval = self.rt.settings.lease_seconds / 3
        while not self._stop.wait(interval):
            if not self.rt.store.heartbeat(
                self.task_id, self.worker_id, self.rt.settings.lease_seconds
            ):
                self.lost.set()
                return

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # compress_level 1: results are written once and read a few times; level 6 costs
    # several times the encode time for a few percent of size.
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _load_inputs(
    rt: Runtime, body: EditCreate
) -> tuple[Image.Image, Image.Image | None, tuple[int, int]]:
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
    return decoded.image, mask, decoded.original_size


def _edit(rt: Runtime, row: TaskRow, worker_id: str, lease: _Lease) -> dict[str, Any]:
    payload = rt.store.payload(row.id)
    if payload is None:
        raise EngineFailed(f"the inputs of task {row.id} are gone; submit it again")
    body = EditCreate.model_validate(payload)
    t0 = time.perf_counter()
    image, mask, _original = _load_inputs(rt, body)
    t_inputs = time.perf_counter()
    rt.engine.validate(image, mask, body.prompt)

    # The bus hears every progress change (streams and sync waiters want them at once); the
    # store gets at most one write per interval, and the cancel flag at most one read, so a
    # fast engine's steps are not paced by the database.
    clock = time.monotonic
    seen = {"progress": -1, "written": float("-inf"), "checked": float("-inf")}
    cancelled = threading.Event()

    def on_progress(fraction: float) -> None:
        progress = _FETCHED + int(max(0.0, min(1.0, fraction)) * (_EDITED - _FETCHED))
        if progress <= seen["progress"]:
            return
        seen["progress"] = progress
        rt.bus.publish(TaskProgress(row.id, progress))
        if clock() - seen["written"] >= _STORE_EVERY:
            seen["written"] = clock()
            rt.store.set_progress(row.id, worker_id, progress, rt.settings.lease_seconds)

    def should_cancel(force: bool = False) -> bool:
        if lease.lost.is_set() or cancelled.is_set():
            return True
        if force or clock() - seen["checked"] >= _CANCEL_EVERY:
            seen["checked"] = clock()
            if rt.store.cancel_requested(row.id):
                cancelled.set()
        return cancelled.is_set()

    on_progress(0.0)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    rt.store.set_seeds(row.id, worker_id, [seed + i for i in range(VARIANTS)])
    preset: Preset = body.mode
    t_engine = time.perf_counter()
    if should_cancel():
        raise TaskCancelled("the task was cancelled")
    # Engines that own a device serialise their jobs on it themselves (diffusers waits for its
    # device in slices, so a queued task can still be cancelled); opencv and upstream need none.
    rt.engine.load(rt.settings.device)
    variants = rt.engine.edit(
        image,
        mask,
        body.prompt,
        n=VARIANTS,
        seed=seed,
        preset=preset,
        on_progress=on_progress,
        should_cancel=should_cancel,
    )
    if should_cancel(force=True):
        # A cancel that arrived during the last step still wins over the result.
        raise TaskCancelled("the task was cancelled")
    if len(variants) != VARIANTS:
        raise EngineFailed(f"engine {rt.engine.name} returned {len(variants)} variants, not 4")
    # The contract promises every pixel outside the mask is the input's, whatever the engine.
    t_save = time.perf_counter()
    variants = [composite(image, v.convert("RGB"), mask) for v in variants]
    grid = make_grid(variants)

    # PNG encoding is the largest fixed cost after the engine; zlib releases the GIL, so the
    # five files encode in parallel.
    encoded = list(rt.encoder.map(_png, [*variants, grid]))
    keys = [f"{row.id}/0_{i}.png" for i in range(VARIANTS)] + [f"{row.id}/grid.png"]
    # In parallel too: to an object store each put is a network round trip.
    list(rt.encoder.map(lambda key, data: rt.blobs.put(key, data, "image/png"), keys, encoded))
    urls = [rt.blobs.url(key, row.base_url) for key in keys[:VARIANTS]]
    grid_url = rt.blobs.url(keys[VARIANTS], row.base_url)
    result = EditResult(
        task_id=row.id,
        image_id=new_image_id(),
        image_url=grid_url,
        image_width=grid.width,
        image_height=grid.height,
        raw_image_url=grid_url,
        raw_image_width=grid.width,
        raw_image_height=grid.height,
        sub_image_urls=urls if body.split_images else [],
        progress=100,
        actions=[],
    )
    t_done = time.perf_counter()
    log.info(
        "edited %dx%d in %.0f ms: inputs %.0f, engine %.0f, results %.0f",
        image.width, image.height, (t_done - t0) * 1000, (t_inputs - t0) * 1000,
        (t_save - t_engine) * 1000, (t_done - t_save) * 1000,
    )
    return result.model_dump()


def run_task(rt: Runtime, task_id: str, worker_id: str) -> TaskState | None:
    """Execute a task this worker has claimed, and record how it ended.

    Every failure ends the task (failed or cancelled) instead of escaping: a broken engine
    or a hostile input must never take the worker down. Returns the final state, or None
    when the task was no longer this worker's to finish.
    """
    row = rt.store.get(task_id)
    if row is None or row.state is not TaskState.running or row.lease_owner != worker_id:
        return None
    with bind(task_id=task_id, trace_id=row.trace_id):
        return _run(rt, row, worker_id)


def _run(rt: Runtime, row: TaskRow, worker_id: str) -> TaskState | None:
    task_id = row.id
    log.info("task started")
    rt.bus.publish(TaskStarted(task_id))
    state: TaskState
    error_status: int | None = None
    with _Lease(rt, task_id, worker_id) as lease:
        try:
            response = _edit(rt, row, worker_id, lease)
            state = TaskState.succeeded
        except TaskCancelled as exc:
            state, response, error_status = (
                TaskState.cancelled,
                failure_body(task_id, row.trace_id, exc),
                exc.status_code,
            )
        except OpenEditsError as exc:
            log.info("task failed: %s: %s", exc.code, exc.message)
            state, response, error_status = (
                TaskState.failed,
                failure_body(task_id, row.trace_id, exc),
                exc.status_code,
            )
        except Exception as exc:
            log.exception("task crashed")
            error = EngineFailed(
                f"the edit failed inside the server ({type(exc).__name__}); "
                f"quote trace_id {row.trace_id} when reporting it"
            )
            state, response, error_status = (
                TaskState.failed,
                failure_body(task_id, row.trace_id, error),
                error.status_code,
            )
    finished = rt.store.finish(
        task_id, state, response, error_status=error_status, worker_id=worker_id
    )
    if not finished:
        # Cancelled (or requeued) while we worked: the earlier decision stands.
        current = rt.store.get(task_id)
        log.info("task result dropped; task is %s", current and current.state.value)
        return None
    log.info("task %s", state.value)
    rt.bus.publish(TaskFinished(task_id, state))
    return state
