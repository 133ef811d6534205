"""The diffusers engine: text-guided inpainting, image-to-image and instruction edits on GPU or CPU.

torch and diffusers are imported inside methods, never at module import, so this module imports
(and `validate()` works) without the `openedits[diffusers]` extra; only `load()`/`edit()` need it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image

from openedits.engines._diffusers_batch import feathered_alpha, paste_back, share_batch_work
from openedits.engines.base import (
    Capabilities,
    EngineInfo,
    Preset,
    ProgressCallback,
    ShouldCancel,
    never_cancel,
    no_progress,
)
from openedits.errors import (
    EngineFailed,
    EngineUnavailable,
    InvalidInput,
    TaskCancelled,
    describe_value,
)

if TYPE_CHECKING:
    from openedits.settings import Settings

__all__ = ["PRESETS", "DiffusersEngine", "PresetParams"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'openedits[diffusers]'"
MemorySaving = Literal["auto", "on", "off"]
WorkSize = Literal["native", "input"]


@dataclass(frozen=True)
class PresetParams:
    """What a `mode` means to a diffusion pipeline."""

    steps: int
    """Denoising steps actually run (num_inference_steps is raised to make up for strength)."""
    guidance_scale: float
    """How strongly the prompt steers (classifier-free guidance)."""
    strength: float
    """Image-to-image only: 0 returns the input, 1 ignores it."""
    inpaint_strength: float = 1.0
    """Inpainting: 1.0 repaints the masked region from noise."""
    image_guidance_scale: float = 1.5
    """InstructPix2Pix only: how closely to stay with the input image."""


# Tuned for Stable Diffusion 1.5/2 and SDXL with DPM-Solver++ (the scheduler this engine switches
# compatible checkpoints to): ~12 steps is usable, 25 is good, 40+ brings little but detail.
PRESETS: dict[str, PresetParams] = {
    "turbo": PresetParams(steps=12, guidance_scale=6.0, strength=0.6),
    "fast": PresetParams(steps=25, guidance_scale=7.0, strength=0.7),
    "relax": PresetParams(steps=40, guidance_scale=7.5, strength=0.75),
}

# One job at a time per device, across every engine instance in the process: two pipelines on one
# GPU would just contend for memory, and pipelines that share components (inpaint and img2img
# built with from_pipe share one scheduler object) are not safe to call concurrently.
_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()
_LOCK_POLL_SECONDS = 0.2
_GiB = 1024**3


def _device_lock(device: str) -> threading.Lock:
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(device, threading.Lock())


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # the extra is not installed
        raise EngineUnavailable(f"the diffusers engine needs torch: {INSTALL_HINT}") from exc
    return torch


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:
        raise EngineUnavailable(
            f"the diffusers engine needs diffusers and transformers: {INSTALL_HINT}"
        ) from exc
    return diffusers


def _dtype_kwarg(diffusers: Any) -> str:
    # Newer diffusers renamed from_pretrained's `torch_dtype` to `dtype` and warn on the old name;
    # older ones (the extra allows >=0.30) only know `torch_dtype`.
    utils = getattr(diffusers, "utils", None)
    deprecation = getattr(utils, "deprecation_utils", None)
    return "dtype" if hasattr(deprecation, "_resolve_dtype") else "torch_dtype"


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def _is_oom(exc: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError is a RuntimeError; MPS and CPU allocators only say it in words.
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


class DiffusersEngine:
    """Edits with a Stable-Diffusion-family checkpoint through Hugging Face diffusers.

    With a mask: the inpainting pipeline. Without one: image-to-image (or, for an inpainting
    checkpoint, inpainting over the whole image). An InstructPix2Pix checkpoint edits the whole
    image from the instruction, and a mask then limits where the edit lands.
    """

    name = "diffusers"
    capabilities = Capabilities(needs_mask=False, honours_prompt=True, max_side=None, batch_size=4)

    def __init__(
        self,
        model: str | os.PathLike[str] | None,
        device: str = "auto",
        *,
        steps: int | None = None,
        presets: Mapping[str, PresetParams] | None = None,
        work_size: WorkSize = "native",
        memory_saving: MemorySaving = "auto",
        low_memory_gib: float = 8.0,
        scheduler: Literal["dpm", "keep"] = "dpm",
        feather: int = 4,
        local_files_only: bool | None = None,
        warmup: bool = False,
    ) -> None:
        """Configure the engine; nothing is imported or loaded until `load()` or `edit()`.

        `steps` overrides every preset's step count (tests run 2). `work_size="native"` runs the
        pipeline near the checkpoint's training resolution (what SD needs for sensible output),
        `"input"` at the input's own size; either way rounded to the model's multiple and resized
        back. `memory_saving="auto"` turns on attention slicing and VAE tiling on MPS, and on CUDA
        when less than `low_memory_gib` is free after loading. `scheduler="dpm"` swaps compatible
        checkpoints to DPM-Solver++, which the presets' step counts assume. `local_files_only`
        defaults to the hub's own offline switch (HF_HUB_OFFLINE). `warmup` runs one 1-step edit
        at load, so kernel selection and lazy imports are paid at start, not by the first request.
        """
        self.model = None if model is None else os.fspath(model)
        self.requested_device = device
        self.presets: dict[str, PresetParams] = dict(presets or PRESETS)
        if steps is not None:
            if steps < 1:
                raise ValueError(f"steps must be at least 1, got {steps}")
            self.presets = {k: replace(p, steps=steps) for k, p in self.presets.items()}
        self.work_size = work_size
        self.memory_saving = memory_saving
        self.low_memory_gib = low_memory_gib
        self.scheduler = scheduler
        self.feather = max(0, feather)
        self.local_files_only = local_files_only
        self.warmup = warmup
        self._load_lock = threading.Lock()
        self._device: str | None = None
        self._dtype = "float32"
        self._kind = ""  # "instruct", "inpaint" (9-channel UNet) or "text2img" (4-channel)
        self._inpaint: Any = None
        self._img2img: Any = None
        self._instruct: Any = None
        self._multiple = 8
        self._native = 512
        self._memory_saving_on = False

    @classmethod
    def from_settings(cls, settings: Settings) -> DiffusersEngine:
        """Build from OPENEDITS_DIFFUSERS_MODEL and OPENEDITS_DEVICE (unloaded)."""
        return cls(
            settings.diffusers_model,
            settings.device,
            memory_saving=settings.diffusers_memory_saving,
            warmup=True,
        )

    # ------------------------------------------------------------------ loading

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory."""
        return self._device is not None

    def load(self, device: str = "auto") -> None:
        """Load the pipelines once onto `device` ("auto": the configured one); cheap after that."""
        wanted = device if device != "auto" else self.requested_device
        if self._device is not None and (wanted == "auto" or wanted == self._device):
            return
        with self._load_lock:  # two threads asking at once load the weights once
            torch = _import_torch()
            resolved = self._resolve_device(torch, wanted)
            if self._device == resolved:
                return
            if self._device is not None:
                self._move(resolved)
                return
            self._load(torch, resolved)

    def _resolve_device(self, torch: Any, device: str) -> str:
        if device == "auto":
            if torch.cuda.is_available():
                return "cuda"
            mps = getattr(torch.backends, "mps", None)
            if mps is not None and mps.is_available():
                return "mps"
            return "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineUnavailable(
                f"OPENEDITS_DEVICE={device!r} but torch sees no CUDA device (torch "
                f"{torch.__version__}); install a CUDA build of torch or set OPENEDITS_DEVICE=auto"
            )
        if device == "mps" and not torch.backends.mps.is_available():
            raise EngineUnavailable("OPENEDITS_DEVICE='mps' but MPS is not available here")
        return device

    def _offline(self) -> bool:
        if self.local_files_only is not None:
            return self.local_files_only
        from huggingface_hub import constants

        # The hub reads HF_HUB_OFFLINE itself; we only follow its decision.
        check = getattr(constants, "is_offline_mode", None)
        return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)

    def _check_model(self) -> str:
        if not self.model:
            raise EngineUnavailable(
                "no diffusion model configured: set OPENEDITS_DIFFUSERS_MODEL to a local diffusers "
                "folder or a hub id (see docs/diffusers.md)"
            )
        path = Path(self.model).expanduser()
        looks_local = path.is_absolute() or self.model.startswith((".", "~")) or path.exists()
        if looks_local:
            if not (path / "model_index.json").is_file():
                raise EngineUnavailable(
                    f"diffusers model folder {self.model!r} not found or has no model_index.json; "
                    "point OPENEDITS_DIFFUSERS_MODEL at a folder written by save_pretrained"
                )
            return str(path)
        return self.model

    def _load(self, torch: Any, device: str) -> None:
        model = self._check_model()
        diffusers = _import_diffusers()
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        offline = self._offline()
        try:
            config = diffusers.DiffusionPipeline.load_config(model, local_files_only=offline)
            class_name = str(config.get("_class_name", ""))
            kwargs: dict[str, Any] = {_dtype_kwarg(diffusers): dtype, "local_files_only": offline}
            if "InstructPix2Pix" in class_name:
                instruct = diffusers.DiffusionPipeline.from_pretrained(model, **kwargs)
                pipes = [instruct]
                inpaint = img2img = None
            else:
                instruct = None
                inpaint = diffusers.AutoPipelineForInpainting.from_pretrained(model, **kwargs)
                self._use_scheduler(diffusers, inpaint)  # before from_pipe, so both share it
                pipes = [inpaint]
                img2img = None
                # A 4-channel UNet also does image-to-image; share its weights, never load twice.
                # An inpainting UNet (9 channels) cannot, so it inpaints over a full mask instead.
                if inpaint.unet.config.in_channels == 4:
                    img2img = diffusers.AutoPipelineForImage2Image.from_pipe(inpaint)
                    pipes.append(img2img)
            main = pipes[0]
            if instruct is not None:
                self._use_scheduler(diffusers, instruct)
            main.to(device)
        except EngineUnavailable:
            raise
        except Exception as exc:
            hint = ""
            if offline and not Path(model).exists():
                hint = " (the hub is offline: HF_HUB_OFFLINE=1; download the model first)"
            if _is_oom(exc):
                hint = f" (out of memory on {device}; free memory or use a smaller model)"
            raise EngineUnavailable(
                f"could not load diffusers model {model!r} on {device}{hint}: "
                f"{type(exc).__name__}: {describe_value(str(exc), 300)} "
                f"(the engine's extra: {INSTALL_HINT})"
            ) from exc
        for pipe in pipes:
            pipe.set_progress_bar_config(disable=True)
        self._instruct, self._inpaint, self._img2img = instruct, inpaint, img2img
        if instruct is not None:
            self._kind = "instruct"
        elif img2img is not None:
            self._kind = "text2img"
        else:
            self._kind = "inpaint"
        vae_factor = int(getattr(main, "vae_scale_factor", 8))
        self._multiple = max(8, vae_factor)
        sample_size = getattr(main.unet.config, "sample_size", 64)
        if isinstance(sample_size, (list, tuple)):
            sample_size = min(sample_size)
        self._native = _round_to(int(sample_size) * vae_factor, self._multiple)
        self._dtype = str(dtype).removeprefix("torch.")
        self._memory_saving_on = self._apply_memory_saving(torch, main, device)
        self._device = device
        if self.warmup:
            self._warm_up(torch)
        log.info(
            "diffusers engine loaded %s (%s, %s) on %s as %s; memory saving %s",
            model,
            class_name,
            self._kind,
            device,
            self._dtype,
            "on" if self._memory_saving_on else "off",
        )

    def _warm_up(self, torch: Any) -> None:
        side = self._native
        params = PresetParams(steps=1, guidance_scale=2.0, strength=1.0)
        gray = Image.new("RGB", (side, side), (128, 128, 128))
        pipe, kwargs = self._call_args(gray, None, "warm-up", 1, params, (side, side))
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(0)]
        self._run(torch, pipe, kwargs, never_cancel, (side, side), 1)

    def _use_scheduler(self, diffusers: Any, pipe: Any) -> None:
        # DPM-Solver++ gives SD-family checkpoints good results in 20-25 steps, which the presets
        # assume; checkpoints on other schedulers (flow matching, LCM, turbo) keep their own.
        if self.scheduler != "dpm":
            return
        compatible = {c.__name__ for c in getattr(pipe.scheduler, "compatibles", [])}
        if "DPMSolverMultistepScheduler" in compatible:
            pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
                pipe.scheduler.config, algorithm_type="dpmsolver++"
            )

    def _apply_memory_saving(self, torch: Any, pipe: Any, device: str) -> bool:
        if self.memory_saving == "off":
            return False
        on = self.memory_saving == "on" or device == "mps"
        if not on and device.startswith("cuda"):
            free, _total = torch.cuda.mem_get_info(torch.device(device))
            on = free < self.low_memory_gib * _GiB
        if on:
            # Slicing trades a little speed for a much lower attention peak; tiling bounds the VAE's
            # peak at large sizes. Both are no-ops for the result's content (up to float noise).
            pipe.enable_attention_slicing()
            if hasattr(pipe.vae, "enable_tiling"):
                pipe.vae.enable_tiling()
        return on

    def _move(self, device: str) -> None:
        for pipe in (self._instruct, self._inpaint):
            if pipe is not None:
                pipe.to(device)
        self._device = device

    def info(self) -> EngineInfo:
        """Name, device, model and whether the weights are loaded (for /healthz)."""
        extra: dict[str, str] = {}
        if self.loaded:
            extra = {
                "dtype": self._dtype,
                "pipeline": self._kind,
                "memory_saving": "on" if self._memory_saving_on else "off",
            }
        return EngineInfo(
            name=self.name,
            device=self._device or self.requested_device,
            model=self.model,
            loaded=self.loaded,
            extra=extra,
        )

    # ------------------------------------------------------------------ editing

    def validate(self, image: Image.Image, mask: Image.Image | None, prompt: str) -> None:
        """Refuse what cannot be edited, without importing torch or loading weights."""
        if not isinstance(image, Image.Image):
            raise InvalidInput(f"image must be a PIL image, got {type(image).__name__}")
        if image.width < 1 or image.height < 1:
            raise InvalidInput(f"image is empty ({image.width}x{image.height})")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInput(
                f"prompt must be a non-empty string, got {describe_value(prompt)}; "
                "the diffusers engine edits toward the prompt"
            )
        if mask is None:
            return
        if not isinstance(mask, Image.Image):
            raise InvalidInput(f"mask must be a PIL image, got {type(mask).__name__}")
        if mask.size != image.size:
            raise InvalidInput(
                f"mask is {mask.width}x{mask.height} but the image is "
                f"{image.width}x{image.height}; they must be the same size"
            )
        if mask.mode not in ("L", "1"):
            raise InvalidInput(
                f"mask must be mode 'L' (255 = repaint, 0 = keep), not {mask.mode!r}"
            )
        if mask.getextrema()[1] == 0:
            raise InvalidInput(
                "mask selects nothing (every pixel is 0 = keep); paint the region to edit white, "
                "or send no mask to edit the whole image"
            )

    def work_size_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) the pipeline runs at for an input of `size` (after `load`)."""
        width, height = size
        scale = 1.0
        if self.work_size == "native":
            # Same area as the checkpoint's training square, same aspect ratio as the input.
            scale = self._native / math.sqrt(width * height)
        return (
            _round_to(int(width * scale), self._multiple),
            _round_to(int(height * scale), self._multiple),
        )

    def edit(
        self,
        image: Image.Image,
        mask: Image.Image | None,
        prompt: str,
        *,
        n: int,
        seed: int,
        preset: Preset,
        on_progress: ProgressCallback = no_progress,
        should_cancel: ShouldCancel = never_cancel,
    ) -> list[Image.Image]:
        """Return `n` variants in one batched pipeline call; variant i uses seed `seed + i`."""
        self.validate(image, mask, prompt)
        if n < 1:
            raise InvalidInput(f"n must be at least 1, got {n}")
        if preset not in self.presets:
            raise InvalidInput(f"unknown preset {preset!r}; use one of {sorted(self.presets)}")
        if should_cancel():
            raise TaskCancelled("cancelled before the edit started")
        self.load()
        torch = _import_torch()
        assert self._device is not None
        original = image.convert("RGB")
        binary = None if mask is None else mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
        if binary is not None and binary.getextrema()[1] == 0:
            raise InvalidInput("mask selects nothing once thresholded at 128 (white = repaint)")
        params = self.presets[preset]
        work = self.work_size_for(original.size)
        pipe, kwargs = self._call_args(original, binary, prompt, n, params, work)
        # CPU generators: the same seed gives the same noise on every device, and one generator
        # per variant makes variant i reproduce alone with seed + i.
        kwargs["generator"] = [
            torch.Generator("cpu").manual_seed((seed + i) % 2**63) for i in range(n)
        ]

        def on_step_end(p: Any, step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            total = max(1, int(getattr(p, "num_timesteps", 0) or params.steps))
            on_progress(min(1.0, (step + 1) / total))
            if should_cancel():
                raise TaskCancelled(f"cancelled after denoising step {step + 1} of {total}")
            return tensors

        kwargs["callback_on_step_end"] = on_step_end
        edited = self._run(torch, pipe, kwargs, should_cancel, work, n)
        return self._finish(original, binary, edited)

    def _call_args(
        self,
        image: Image.Image,
        mask: Image.Image | None,
        prompt: str,
        n: int,
        params: PresetParams,
        work: tuple[int, int],
    ) -> tuple[Any, dict[str, Any]]:
        # The image, mask and prompt go in n times (one per variant) rather than once with
        # num_images_per_prompt=n: the inpainting pipeline encodes a single image with the first
        # generator only, which would tie every variant's latents to variant 0's seed. For the
        # pipelines it knows, `share_batch_work` then encodes them once for all variants.
        small = image.resize(work, Image.Resampling.LANCZOS) if image.size != work else image
        args: dict[str, Any] = {
            "prompt": [prompt] * n,
            "image": [small] * n,
            "num_images_per_prompt": 1,
            "guidance_scale": params.guidance_scale,
            "output_type": "pil",
        }
        if self._instruct is not None:
            args["num_inference_steps"] = params.steps
            args["image_guidance_scale"] = params.image_guidance_scale
            return self._instruct, args
        width, height = work
        args["width"], args["height"] = width, height
        if mask is None and self._img2img is not None:
            args["strength"] = params.strength
            args["num_inference_steps"] = self._steps_for(params.steps, params.strength)
            return self._img2img, args
        if mask is None:  # an inpainting checkpoint without a mask: repaint everywhere, gently
            small_mask = Image.new("L", work, 255)
            strength = params.strength
        else:
            small_mask = mask.resize(work, Image.Resampling.NEAREST) if mask.size != work else mask
            strength = params.inpaint_strength
        args["mask_image"] = [small_mask] * n
        args["strength"] = strength
        args["num_inference_steps"] = self._steps_for(params.steps, strength)
        return self._inpaint, args

    @staticmethod
    def _steps_for(steps: int, strength: float) -> int:
        # img2img runs only int(num_inference_steps * strength) steps; ask for enough that the
        # preset's count is what actually runs (and what progress counts).
        total = max(steps, math.ceil(steps / max(strength, 1e-3)))
        while int(total * strength) < steps:
            total += 1
        return total

    def _run(
        self,
        torch: Any,
        pipe: Any,
        kwargs: dict[str, Any],
        should_cancel: ShouldCancel,
        work: tuple[int, int],
        n: int,
    ) -> list[Image.Image]:
        assert self._device is not None
        lock = _device_lock(self._device)
        # Wait for the device in short slices so a task cancelled while queued behind another
        # job on the same device stops without ever running.
        while not lock.acquire(timeout=_LOCK_POLL_SECONDS):
            if should_cancel():
                raise TaskCancelled("cancelled while waiting for the device")
        try:
            with torch.inference_mode():
                # The prompt and image are encoded once here, not once per variant.
                result = pipe(**share_batch_work(torch, pipe, kwargs))
        except TaskCancelled:
            raise
        except Exception as exc:
            if _is_oom(exc):
                if self._device.startswith("cuda"):
                    torch.cuda.empty_cache()  # give the next job the memory back
                raise EngineFailed(
                    f"out of memory on {self._device} editing at {work[0]}x{work[1]} with {n} "
                    "variants; try a smaller image, fewer concurrent jobs, or memory saving "
                    "(attention slicing / VAE tiling) for this device"
                ) from exc
            log.exception("diffusers pipeline failed")
            raise EngineFailed(
                f"the diffusion pipeline failed: {type(exc).__name__}: "
                f"{describe_value(str(exc), 300)}"
            ) from exc
        finally:
            lock.release()
        return list(result.images)

    def _finish(
        self, original: Image.Image, mask: Image.Image | None, edited: list[Image.Image]
    ) -> list[Image.Image]:
        resized = [
            e.convert("RGB").resize(original.size, Image.Resampling.LANCZOS)
            if e.size != original.size
            else e.convert("RGB")
            for e in edited
        ]
        if mask is None:
            return resized
        alpha = feathered_alpha(mask, self.feather)  # once: every variant shares the mask
        return [paste_back(original, e, alpha) for e in resized]
