"""The diffusers engine: instruction edits and inpainting with today's open models, on GPU or CPU.

Families (detected from the checkpoint's model_index.json, see `_diffusers_families`):
Qwen-Image-Edit and its 2509/2511 revisions, FLUX.2 klein, FLUX.1 Kontext, FLUX.1 Fill, and the
Stable Diffusion family (1.5/2/XL, inpainting, InstructPix2Pix). An optional second checkpoint
takes the masked requests. torch and diffusers are imported inside methods, never at module
import, so this module imports (and `validate()` works) without the `openedits[diffusers]` extra.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image

from openedits.engines._diffusers_batch import feathered_alpha, paste_back
from openedits.engines._diffusers_families import FamilyPreset, family_for
from openedits.engines._diffusers_options import (
    Dtype,
    Lora,
    Offload,
    Quantization,
    SpeedOptions,
    StepCache,
    parse_loras,
)
from openedits.engines._diffusers_pipes import (
    PER_VARIANT,
    LoadedModel,
    PresetParams,
    apply_lora_presets,
    apply_memory_saving,
    call_args,
    load_model,
    round_to,
)
from openedits.engines._diffusers_run import free_device, is_oom, run_pipeline
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

# Tuned for Stable Diffusion 1.5/2 and SDXL with DPM-Solver++ (the scheduler this engine switches
# compatible checkpoints to): ~12 steps is usable, 25 is good, 40+ brings little but detail.
# The transformer families have their own, in _diffusers_families.
PRESETS: dict[str, PresetParams] = {
    "turbo": PresetParams(steps=12, guidance_scale=6.0, strength=0.6),
    "fast": PresetParams(steps=25, guidance_scale=7.0, strength=0.7),
    "relax": PresetParams(steps=40, guidance_scale=7.5, strength=0.75),
}

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


class DiffusersEngine:
    """Edits with a diffusers checkpoint: instruction edits, inpainting, image-to-image.

    Without a mask: the family's edit pipeline (SD: image-to-image, or inpainting over the whole
    image for an inpainting checkpoint). With one: the family's inpainting pipeline, derived from
    the loaded one so the weights are held once, or the mask model when one is configured; a
    family without an inpainting pipeline edits and is pasted back inside the mask. Pixels the
    mask keeps are always the input's, bit for bit.
    """

    name = "diffusers"
    capabilities = Capabilities(needs_mask=False, honours_prompt=True, max_side=None, batch_size=4)

    def __init__(
        self,
        model: str | os.PathLike[str] | None,
        device: str = "auto",
        *,
        mask_model: str | os.PathLike[str] | None = None,
        steps: int | None = None,
        presets: Mapping[str, PresetParams] | None = None,
        work_size: WorkSize = "native",
        memory_saving: MemorySaving = "auto",
        low_memory_gib: float = 8.0,
        scheduler: Literal["dpm", "keep"] = "dpm",
        feather: int = 4,
        local_files_only: bool | None = None,
        warmup: bool = False,
        dtype: Dtype = "auto",
        offload: Offload = "none",
        quantization: Quantization = "none",
        compile: bool = False,
        cache: StepCache = "none",
        loras: str | tuple[Lora, ...] = (),
    ) -> None:
        """Configure the engine; nothing is imported or loaded until `load()` or `edit()`.

        `mask_model`, when given, takes every masked request (e.g. FLUX.1 Fill) while `model`
        takes the rest; both load and stay warm. `steps` overrides every preset's step count
        (tests run 2). `work_size="native"` runs near the family's native area (what the models
        need for sensible output), `"input"` at the input's own size; either way rounded to the
        model's multiple and resized back. `memory_saving="auto"` turns on attention slicing and
        VAE tiling on MPS, and on CUDA when less than `low_memory_gib` is free after loading.
        `scheduler="dpm"` swaps SD-family checkpoints to DPM-Solver++ (transformer families
        keep their flow-matching scheduler). `local_files_only` defaults to HF_HUB_OFFLINE.
        `warmup` runs one 1-step edit at load. `dtype`, `offload`, `quantization`, `compile`,
        `cache` and `loras` are the memory and speed settings (see _diffusers_options).
        """
        self.model = None if model is None else os.fspath(model)
        self.mask_model = None if mask_model is None else os.fspath(mask_model)
        self.requested_device = device
        self.presets: dict[str, PresetParams] = dict(presets or PRESETS)
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        self.steps = steps
        if steps is not None:
            self.presets = {k: replace(p, steps=steps) for k, p in self.presets.items()}
        self.work_size = work_size
        self.memory_saving = memory_saving
        self.low_memory_gib = low_memory_gib
        self.scheduler = scheduler
        self.feather = max(0, feather)
        self.local_files_only = local_files_only
        self.warmup = warmup
        try:
            parsed = parse_loras(loras) if isinstance(loras, str) else tuple(loras)
        except ValueError as exc:  # a malformed entry fails at start, quoting it
            raise EngineUnavailable(str(exc)) from None
        self.options = SpeedOptions(
            dtype=dtype,
            offload=offload,
            quantization=quantization,
            compile=compile,
            cache=cache,
            loras=parsed,
        )
        self._load_lock = threading.Lock()
        self._device: str | None = None
        self._main: LoadedModel | None = None
        self._masked: LoadedModel | None = None
        # Known before loading for a local folder, so submits without a mask are refused at once.
        self.capabilities = replace(type(self).capabilities, needs_mask=self._needs_mask())

    @classmethod
    def from_settings(cls, settings: Settings) -> DiffusersEngine:
        """Build from the OPENEDITS_DIFFUSERS_* settings and OPENEDITS_DEVICE (unloaded)."""
        return cls(
            settings.diffusers_model,
            settings.device,
            mask_model=settings.diffusers_mask_model,
            memory_saving=settings.diffusers_memory_saving,
            dtype=settings.diffusers_dtype,
            offload=settings.diffusers_offload,
            quantization=settings.diffusers_quantization,
            compile=settings.diffusers_compile,
            cache=settings.diffusers_cache,
            loras=settings.diffusers_loras,
            warmup=True,
        )

    # ------------------------------------------------------------------ loading

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory."""
        return self._device is not None

    # The SD pipelines of the main checkpoint, by the names the engine has always used.
    @property
    def _inpaint(self) -> Any:
        return None if self._main is None else self._main.inpaint

    @property
    def _img2img(self) -> Any:
        return None if self._main is None else self._main.img2img

    @property
    def _instruct(self) -> Any:
        main = self._main
        return main.main if main is not None and main.kind == "instruct" else None

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

    @staticmethod
    def _check_model(model: str | None, setting: str = "OPENEDITS_DIFFUSERS_MODEL") -> str:
        if not model:
            raise EngineUnavailable(
                f"no diffusion model configured: set {setting} to a local diffusers "
                "folder or a hub id (see docs/diffusers.md)"
            )
        path = Path(model).expanduser()
        looks_local = path.is_absolute() or model.startswith((".", "~")) or path.exists()
        if looks_local:
            if not (path / "model_index.json").is_file():
                raise EngineUnavailable(
                    f"diffusers model folder {model!r} not found or has no model_index.json; "
                    f"point {setting} at a folder written by save_pretrained"
                )
            return str(path)
        return model

    def _load(self, torch: Any, device: str) -> None:
        model = self._check_model(self.model)
        mask_model = None
        if self.mask_model:
            mask_model = self._check_model(self.mask_model, "OPENEDITS_DIFFUSERS_MASK_MODEL")
        diffusers = _import_diffusers()
        main = self._load_one(torch, diffusers, model, device)
        masked = None
        if mask_model is not None:
            masked = self._load_one(torch, diffusers, mask_model, device)
        self._main, self._masked = main, masked
        if main.needs_mask and masked is None:
            self.capabilities = replace(self.capabilities, needs_mask=True)
        self._device = device
        if self.warmup:
            self._warm_up(torch)
        for slot in (main, masked):
            if slot is not None:
                log.info(
                    "diffusers engine loaded %s (%s, %s) on %s as %s; %s; memory saving %s",
                    slot.model,
                    slot.class_name,
                    slot.kind,
                    device,
                    slot.dtype,
                    ", ".join(slot.applied) or "no speed options",
                    "on" if slot.memory_saving_on else "off",
                )

    def _load_one(self, torch: Any, diffusers: Any, model: str, device: str) -> LoadedModel:
        offline = self._offline()
        try:
            loaded = load_model(
                torch,
                diffusers,
                model,
                device,
                self.options,
                offline=offline,
                scheduler=self.scheduler,
            )
        except EngineUnavailable:
            raise
        except Exception as exc:
            hint = ""
            if offline and not Path(model).exists():
                hint = " (the hub is offline: HF_HUB_OFFLINE=1; download the model first)"
            if is_oom(exc):
                hint = (
                    f" (out of memory on {device}; try OPENEDITS_DIFFUSERS_QUANTIZATION, "
                    "OPENEDITS_DIFFUSERS_OFFLOAD=model, or a smaller model)"
                )
            free_device(torch, device)
            raise EngineUnavailable(
                f"could not load diffusers model {model!r} on {device}{hint}: "
                f"{type(exc).__name__}: {describe_value(str(exc), 300)} "
                f"(the engine's extra: {INSTALL_HINT})"
            ) from exc
        if not loaded.family.sd:
            presets = dict(loaded.family_presets)
            if self.steps is not None:
                presets = {k: replace(p, steps=self.steps) for k, p in presets.items()}
            apply_lora_presets(presets, self.options)
            loaded.family_presets = presets
        loaded.memory_saving_on = apply_memory_saving(
            torch, loaded, device, self.memory_saving, self.low_memory_gib
        )
        return loaded

    def _warm_up(self, torch: Any) -> None:
        for slot in (self._main, self._masked):
            if slot is None:
                continue
            side = slot.native
            gray = Image.new("RGB", (side, side), (128, 128, 128))
            mask = Image.new("L", (side, side), 255) if slot.needs_mask else None
            preset: PresetParams | FamilyPreset = PresetParams(1, 2.0, 1.0)
            if not slot.family.sd:
                preset = replace(slot.family_presets["turbo"], steps=1)
            pipe, kwargs, _ = call_args(slot, gray, mask, "warm-up", 1, preset, (side, side))
            kwargs["generator"] = [torch.Generator("cpu").manual_seed(0)]
            self._run(torch, slot, pipe, kwargs, never_cancel, (side, side), 1)

    def _move(self, device: str) -> None:
        for slot in (self._main, self._masked):
            if slot is not None:
                slot.main.to(device)
        self._device = device

    def info(self) -> EngineInfo:
        """Name, device, model and whether the weights are loaded (for /healthz)."""
        extra: dict[str, str] = {}
        if self.mask_model:
            extra["mask_model"] = self.mask_model
        main, masked = self._main, self._masked
        if main is not None:
            extra.update(self._describe(main, ""))
        if masked is not None:
            extra.update(self._describe(masked, "mask_"))
        return EngineInfo(
            name=self.name,
            device=self._device or self.requested_device,
            model=self.model,
            loaded=self.loaded,
            extra=extra,
        )

    @staticmethod
    def _describe(slot: LoadedModel, prefix: str) -> dict[str, str]:
        described = {
            f"{prefix}dtype": slot.dtype,
            f"{prefix}pipeline": slot.kind,
            f"{prefix}memory_saving": "on" if slot.memory_saving_on else "off",
        }
        if not slot.family.sd:
            described[f"{prefix}family"] = slot.family.title
        if slot.applied:
            described[f"{prefix}speed"] = ", ".join(slot.applied)
        return described

    # ------------------------------------------------------------------ editing

    def _needs_mask(self) -> bool:
        """Whether unmasked requests must be refused, known without loading where possible."""
        if self._main is not None:
            return self._main.needs_mask
        if self.model is None or self.mask_model:
            return False
        index = Path(self.model).expanduser() / "model_index.json"
        try:
            config = json.loads(index.read_text())
        except (OSError, ValueError):
            return False  # a hub id, or unreadable: load() will say
        return family_for(config).needs_mask if isinstance(config, dict) else False

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
            if self._needs_mask():
                raise InvalidInput(
                    f"mask is required: the model {self.model!r} repaints only what a mask "
                    "marks (FLUX.1 Fill); send a mask (white = repaint)"
                )
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

    def _slot_for(self, masked: bool) -> LoadedModel:
        slot = self._masked if masked and self._masked is not None else self._main
        assert slot is not None
        return slot

    def work_size_for(self, size: tuple[int, int], masked: bool = False) -> tuple[int, int]:
        """The (width, height) the pipeline runs at for an input of `size` (after `load`)."""
        slot = self._slot_for(masked)
        width, height = size
        scale = 1.0
        if self.work_size == "native":
            # Same area as the family's native square, same aspect ratio as the input.
            scale = slot.native / math.sqrt(width * height)
        floor = slot.family.min_side
        if floor and min(width, height) * scale < floor:
            scale = floor / min(width, height)  # up to the smallest the pipeline accepts
        return (
            round_to(int(width * scale), slot.multiple),
            round_to(int(height * scale), slot.multiple),
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
        original = image.convert("RGB")
        binary = None if mask is None else mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
        if binary is not None and binary.getextrema()[1] == 0:
            raise InvalidInput("mask selects nothing once thresholded at 128 (white = repaint)")
        slot = self._slot_for(binary is not None)
        params: PresetParams | FamilyPreset = (
            self.presets[preset] if slot.family.sd else slot.family_presets[preset]
        )
        work = self.work_size_for(original.size, binary is not None)
        pipe, kwargs, _paste = call_args(slot, original, binary, prompt, n, params, work)
        # CPU generators: the same seed gives the same noise on every device, and one generator
        # per variant makes variant i reproduce alone with seed + i.
        kwargs["generator"] = [
            torch.Generator("cpu").manual_seed((seed + i) % 2**63) for i in range(n)
        ]

        # Pipelines that run one variant per call report each call's steps as a share of all.
        calls = {"done": 0, "of": n if type(pipe).__name__ in PER_VARIANT else 1}

        def on_step_end(p: Any, step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            total = max(1, int(getattr(p, "num_timesteps", 0) or params.steps))
            done = calls["done"] * total + step + 1
            on_progress(min(1.0, done / (total * calls["of"])))
            if should_cancel():
                raise TaskCancelled(
                    f"cancelled after denoising step {done} of {total * calls['of']}"
                )
            return tensors

        kwargs["callback_on_step_end"] = on_step_end
        kwargs["_calls"] = calls
        edited = self._run(torch, slot, pipe, kwargs, should_cancel, work, n)
        return self._finish(original, binary, edited)

    def _run(
        self,
        torch: Any,
        slot: LoadedModel,
        pipe: Any,
        kwargs: dict[str, Any],
        should_cancel: ShouldCancel,
        work: tuple[int, int],
        n: int,
    ) -> list[Image.Image]:
        assert self._device is not None
        return run_pipeline(
            torch,
            slot,
            pipe,
            kwargs,
            device=self._device,
            cache_on=self.options.cache != "none",
            may_save_memory=self.memory_saving != "off",
            should_cancel=should_cancel,
            work=work,
            n=n,
        )

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
