"""Running a pipeline call of the diffusers engine: the device lock, failures, the OOM retry.

Private to the engine. One job at a time per device, across every engine instance in the
process: two pipelines on one GPU would just contend for memory, and pipelines that share
components (built with from_pipe they share one scheduler object) are not safe to call
concurrently. A failed job frees what it held on the device; a job that ran out of memory with
memory saving off runs once more, same seeds, with it on, and the task's notes say so.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Callable
from typing import Any

from PIL import Image

from openedits.engines._diffusers_batch import share_batch_work
from openedits.engines._diffusers_pipes import LoadedModel, enable_memory_saving
from openedits.engines.base import ShouldCancel, add_note
from openedits.errors import EngineFailed, TaskCancelled, describe_value

__all__ = ["free_device", "is_oom", "run_pipeline"]

log = logging.getLogger(__name__)

_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()
_LOCK_POLL_SECONDS = 0.2


def _device_lock(device: str) -> threading.Lock:
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(device, threading.Lock())


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is an out-of-memory error of any device's allocator."""
    # torch.cuda.OutOfMemoryError is a RuntimeError; MPS and CPU allocators only say it in words.
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def free_device(torch: Any, device: str) -> None:
    """Give the device back what a failed job held (its activations are garbage now)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    elif device == "mps":
        torch.mps.empty_cache()


def run_pipeline(
    torch: Any,
    slot: LoadedModel,
    pipe: Any,
    kwargs: dict[str, Any],
    *,
    device: str,
    cache_on: bool,
    may_save_memory: bool,
    should_cancel: ShouldCancel,
    work: tuple[int, int],
    n: int,
) -> list[Image.Image]:
    """Call `pipe` holding the device; on out of memory, retry once with memory saving on."""
    lock = _device_lock(device)
    # Wait for the device in short slices so a task cancelled while queued behind another
    # job on the same device stops without ever running.
    while not lock.acquire(timeout=_LOCK_POLL_SECONDS):
        if should_cancel():
            raise TaskCancelled("cancelled while waiting for the device")
    seeds = [g.initial_seed() for g in kwargs.get("generator") or []]
    try:
        try:
            return _call(torch, slot, pipe, kwargs, cache_on)
        except TaskCancelled:
            raise
        except Exception as exc:
            free_device(torch, device)  # a failed job leaves nothing on the device
            if not is_oom(exc) or slot.memory_saving_on or not may_save_memory:
                raise _failure(exc, device, work, n) from exc
        # Out of memory with memory saving off: once more with it on (it stays on), same seeds.
        enable_memory_saving(slot)
        note = (
            f"out of memory on {device} at {work[0]}x{work[1]} with {n} variants; "
            "retried once with memory saving on (VAE tiling and slicing"
            + (", attention slicing)" if slot.family.sd else ")")
        )
        log.warning("%s", note)
        add_note(note)
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        try:
            return _call(torch, slot, pipe, kwargs, cache_on)
        except TaskCancelled:
            raise
        except Exception as exc:
            free_device(torch, device)
            raise _failure(exc, device, work, n, retried=True) from exc
    finally:
        lock.release()


def _call(
    torch: Any, slot: LoadedModel, pipe: Any, kwargs: dict[str, Any], cache_on: bool
) -> list[Image.Image]:
    args = dict(kwargs)
    calls = args.pop("_calls", {"done": 0, "of": 1})
    if calls["of"] == 1:
        return _call_once(torch, slot, pipe, args, cache_on)
    images: list[Image.Image] = []
    for i, generator in enumerate(args.pop("generator")):
        calls["done"] = i  # the step callback reports this call's steps as a share of all
        one = {**args, "generator": [generator], "num_images_per_prompt": 1}
        images.extend(_call_once(torch, slot, pipe, one, cache_on))
    calls["done"] = 0
    return images


def _call_once(
    torch: Any, slot: LoadedModel, pipe: Any, kwargs: dict[str, Any], cache_on: bool
) -> list[Image.Image]:
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    context: Callable[[], Any] = contextlib.nullcontext
    if cache_on and denoiser is not None:
        # A cancelled call leaves the cache's per-step state behind; start each call clean.
        denoiser._reset_stateful_cache()
        if slot.family.cache_context:
            # Kontext and Fill do not open a cache context themselves; one "cond" pass a step.
            context = lambda: denoiser.cache_context("cond")  # noqa: E731
    with torch.inference_mode(), context():
        # SD pipelines get the prompt and image encoded once here, not once per variant.
        result = pipe(**share_batch_work(torch, pipe, kwargs))
    return list(result.images)


def _failure(
    exc: Exception, device: str, work: tuple[int, int], n: int, *, retried: bool = False
) -> EngineFailed:
    if is_oom(exc):
        again = " even with memory saving on" if retried else ""
        return EngineFailed(
            f"out of memory on {device} editing at {work[0]}x{work[1]} with {n} "
            f"variants{again}; try a smaller image, fewer concurrent jobs, "
            "OPENEDITS_DIFFUSERS_MEMORY_SAVING=on, OPENEDITS_DIFFUSERS_OFFLOAD=model or "
            "OPENEDITS_DIFFUSERS_QUANTIZATION"
        )
    log.exception("diffusers pipeline failed")
    return EngineFailed(
        f"the diffusion pipeline failed: {type(exc).__name__}: {describe_value(str(exc), 300)}"
    )
