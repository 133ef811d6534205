"""One loaded checkpoint of the diffusers engine: its pipelines and their call arguments.

Private to the engine. `load_model` reads a checkpoint once and derives every pipeline it needs
from it with `from_pipe` (the weights are held once); `call_args` turns an edit request into the
keyword arguments of the right pipeline for the checkpoint's family:

- SD family (UNet checkpoints): inpainting with a mask, image-to-image without (or inpainting over
  the whole image for a 9-channel inpainting UNet), InstructPix2Pix's instruction edit;
- instruction families (Qwen-Image-Edit, FLUX.2 klein, FLUX.1 Kontext): the edit pipeline without
  a mask, its inpainting sibling with one; a family without a sibling (Qwen-Image-Edit-Plus) edits
  the whole image and the engine pastes the edit back inside the mask;
- FLUX.1 Fill: inpainting only; a request without a mask is refused.

All variants go in one call: one prompt, one image, `num_images_per_prompt=n` and one CPU
generator per variant. These pipelines encode the image to its latents' mode (no seed involved),
so variant i's noise, and so its result, depends only on generator i: it reproduces alone.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from openedits.engines._diffusers_families import Family, FamilyPreset, family_for
from openedits.engines._diffusers_options import (
    SpeedOptions,
    apply_speed,
    check_options,
    quantization_config,
    resolve_dtype,
)
from openedits.errors import InvalidInput

__all__ = [
    "PER_VARIANT",
    "LoadedModel",
    "PresetParams",
    "apply_lora_presets",
    "apply_memory_saving",
    "call_args",
    "enable_memory_saving",
    "finish_loading",
    "load_model",
    "round_to",
    "steps_for",
    "transformer_model",
]

log = logging.getLogger(__name__)
_GiB = 1024**3
_SAMPLES_IMAGE_LATENTS = {"FluxFillPipeline"}
# Samples the image's latents with generator 0 for every variant and refuses n copies of the
# image (its processor counts one image token per prompt): it runs one variant per call.
PER_VARIANT = {"QwenImageEditInpaintPipeline"}


@dataclass(frozen=True)
class PresetParams:
    """What a `mode` means to a Stable Diffusion pipeline."""

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


@dataclass
class LoadedModel:
    """A checkpoint in memory: its family and the pipelines that share its weights."""

    model: str
    family: Family
    class_name: str
    kind: str
    """SD: "inpaint", "text2img" or "instruct"; otherwise the family's key."""
    main: Any
    inpaint: Any = None
    img2img: Any = None
    native: int = 512
    multiple: int = 8
    dtype: str = "float32"
    applied: list[str] = field(default_factory=list)
    memory_saving_on: bool = False
    family_presets: dict[str, FamilyPreset] = field(default_factory=dict)

    @property
    def pipes(self) -> list[Any]:
        """Every pipeline object (they share modules)."""
        return [p for p in (self.main, self.inpaint, self.img2img) if p is not None]

    @property
    def needs_mask(self) -> bool:
        """Whether this checkpoint can only repaint what a mask marks."""
        return self.family.needs_mask


def round_to(value: int, multiple: int) -> int:
    """`value` rounded to the nearest positive multiple of `multiple`."""
    return max(multiple, round(value / multiple) * multiple)


def steps_for(steps: int, strength: float) -> int:
    """num_inference_steps such that `int(n * strength)`, the steps actually run, is `steps`."""
    total = max(steps, math.ceil(steps / max(strength, 1e-3)))
    while int(total * strength) < steps:
        total += 1
    return total


def _dtype_kwarg(diffusers: Any) -> str:
    # Newer diffusers renamed from_pretrained's `torch_dtype` to `dtype` and warn on the old name;
    # older ones (the extra allows >=0.30) only know `torch_dtype`.
    utils = getattr(diffusers, "utils", None)
    deprecation = getattr(utils, "deprecation_utils", None)
    return "dtype" if hasattr(deprecation, "_resolve_dtype") else "torch_dtype"


def detect_family(diffusers: Any, model: str, offline: bool) -> tuple[Family, str]:
    """The checkpoint's family and `_class_name`, from its model_index.json."""
    config = diffusers.DiffusionPipeline.load_config(model, local_files_only=offline)
    return family_for(dict(config)), str(config.get("_class_name", ""))


def load_model(
    torch: Any,
    diffusers: Any,
    model: str,
    device: str,
    options: SpeedOptions,
    *,
    offline: bool,
    scheduler: str,
) -> LoadedModel:
    """Load `model` onto `device` with `options` (refused first if they cannot work here)."""
    family, class_name = detect_family(diffusers, model, offline)
    check_options(torch, options, device, family)
    dtype = resolve_dtype(torch, options, device, family)
    kwargs: dict[str, Any] = {_dtype_kwarg(diffusers): dtype, "local_files_only": offline}
    loaded = (
        _load_sd(diffusers, model, class_name, kwargs, scheduler)
        if family.sd
        else _load_transformer(diffusers, model, family, class_name, kwargs, options, offline)
    )
    if options.loras:
        _load_loras(loaded.main, options)
    return finish_loading(diffusers, loaded, options, device, dtype)


def finish_loading(
    diffusers: Any, loaded: LoadedModel, options: SpeedOptions, device: str, dtype: Any
) -> LoadedModel:
    """Derive the inpainting sibling, place the weights and turn the speed options on.

    The part of loading that reads no file: bench/gpu_check.py calls it on a pipeline built from
    configuration with random weights.
    """
    family = loaded.family
    if family.inpaint is not None and loaded.inpaint is None:
        loaded.inpaint = getattr(diffusers, family.inpaint).from_pipe(loaded.main)
    loaded.applied = apply_speed(diffusers, loaded.main, options, device, family)
    for pipe in loaded.pipes:
        pipe.set_progress_bar_config(disable=True)
    loaded.dtype = str(dtype).removeprefix("torch.")
    if options.loras:
        loaded.applied.append("loras=" + "+".join(lora.source for lora in options.loras))
    return loaded


def transformer_model(model: str, family: Family, class_name: str, pipe: Any) -> LoadedModel:
    """A LoadedModel for an already built pipeline of a transformer family."""
    multiple = int(getattr(pipe, "vae_scale_factor", 8)) * 2
    return LoadedModel(
        model,
        family,
        class_name,
        family.key,
        pipe,
        native=round_to(int(math.sqrt(family.native_area)), multiple),
        multiple=multiple,
        family_presets=dict(family.presets),
    )


def _load_sd(
    diffusers: Any, model: str, class_name: str, kwargs: dict[str, Any], scheduler: str
) -> LoadedModel:
    family = family_for({"_class_name": class_name})
    if "InstructPix2Pix" in class_name:
        pipe = diffusers.DiffusionPipeline.from_pretrained(model, **kwargs)
        _use_scheduler(diffusers, pipe, scheduler)
        loaded = LoadedModel(model, family, class_name, "instruct", pipe)
    else:
        inpaint = diffusers.AutoPipelineForInpainting.from_pretrained(model, **kwargs)
        _use_scheduler(diffusers, inpaint, scheduler)  # before from_pipe, so both share it
        # A 4-channel UNet also does image-to-image; share its weights, never load twice.
        # An inpainting UNet (9 channels) cannot, so it inpaints over a full mask instead.
        img2img = None
        if inpaint.unet.config.in_channels == 4:
            img2img = diffusers.AutoPipelineForImage2Image.from_pipe(inpaint)
        kind = "text2img" if img2img is not None else "inpaint"
        loaded = LoadedModel(model, family, class_name, kind, inpaint, inpaint, img2img)
    vae_factor = int(getattr(loaded.main, "vae_scale_factor", 8))
    loaded.multiple = max(8, vae_factor)
    sample_size = getattr(loaded.main.unet.config, "sample_size", 64)
    if isinstance(sample_size, (list, tuple)):
        sample_size = min(sample_size)
    loaded.native = round_to(int(sample_size) * vae_factor, loaded.multiple)
    return loaded


def _use_scheduler(diffusers: Any, pipe: Any, scheduler: str) -> None:
    # DPM-Solver++ gives SD-family checkpoints good results in 20-25 steps, which the presets
    # assume; checkpoints on other schedulers (flow matching, LCM, turbo) keep their own.
    if scheduler != "dpm":
        return
    compatible = {c.__name__ for c in getattr(pipe.scheduler, "compatibles", [])}
    if "DPMSolverMultistepScheduler" in compatible:
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++"
        )


def _load_transformer(
    diffusers: Any,
    model: str,
    family: Family,
    class_name: str,
    kwargs: dict[str, Any],
    options: SpeedOptions,
    offline: bool,
) -> LoadedModel:
    quant = quantization_config(diffusers, options, family)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if family.key.startswith("qwen"):
        from openedits.engines._diffusers_qwen import load_image_only_processor

        kwargs["processor"] = load_image_only_processor(model, local_files_only=offline)
    main = getattr(diffusers, family.pipeline).from_pretrained(model, **kwargs)
    return transformer_model(model, family, class_name, main)


def _load_loras(pipe: Any, options: SpeedOptions) -> None:
    names = []
    for i, lora in enumerate(options.loras):
        name = f"lora{i}"
        extra = {"weight_name": lora.weight_name} if lora.weight_name else {}
        pipe.load_lora_weights(lora.source, adapter_name=name, **extra)
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in options.loras])
    if options.quantization == "none":
        # Fused into the weights, a LoRA costs nothing per step; the adapters are then dropped.
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()


def apply_lora_presets(presets: dict[str, FamilyPreset], options: SpeedOptions) -> None:
    """A step-distillation LoRA (Lightning) sets every mode's steps and guidance."""
    for lora in options.loras:
        if lora.steps is None:
            continue
        guidance = lora.guidance if lora.guidance is not None else 1.0
        for mode, preset in presets.items():
            presets[mode] = replace(
                preset,
                steps=lora.steps,
                true_cfg_scale=guidance if preset.true_cfg_scale > 1.0 else preset.true_cfg_scale,
                guidance_scale=preset.guidance_scale if preset.true_cfg_scale > 1.0 else guidance,
            )


def apply_memory_saving(
    torch: Any, loaded: LoadedModel, device: str, mode: str, low: float
) -> bool:
    """Attention slicing (UNets) and VAE tiling when asked, on MPS, or when CUDA memory is short."""
    if mode == "off":
        return False
    on = mode == "on" or device == "mps"
    if not on and device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        on = free < low * _GiB
    if on:
        enable_memory_saving(loaded)
    return on


def enable_memory_saving(loaded: LoadedModel) -> None:
    """Turn on the savings that do not change the result beyond float noise."""
    pipe = loaded.main
    if loaded.family.sd:
        # Slicing trades a little speed for a much lower attention peak (UNet attention only).
        pipe.enable_attention_slicing()
    vae: Any = getattr(pipe, "vae", None)
    if hasattr(vae, "enable_tiling"):
        vae.enable_tiling()  # bounds the VAE's peak at large sizes
    if hasattr(vae, "enable_slicing"):
        vae.enable_slicing()  # decodes the variants one at a time
    loaded.memory_saving_on = True


# ---------------------------------------------------------------- call arguments


def call_args(
    loaded: LoadedModel,
    image: Image.Image,
    mask: Image.Image | None,
    prompt: str,
    n: int,
    preset: PresetParams | FamilyPreset,
    work: tuple[int, int],
) -> tuple[Any, dict[str, Any], bool]:
    """The pipeline, its arguments (without generators and callback), and whether to paste back.

    "Paste back" is true when the pipeline edited the whole image for a masked request (a family
    without an inpainting sibling, or InstructPix2Pix); the engine always composites inside the
    mask anyway, so the flag is for /healthz and the logs.
    """
    small = image.resize(work, Image.Resampling.LANCZOS) if image.size != work else image
    small_mask = None
    if mask is not None:
        small_mask = mask.resize(work, Image.Resampling.NEAREST) if mask.size != work else mask
    if loaded.family.sd:
        assert isinstance(preset, PresetParams)
        pipe, args = _sd_args(loaded, small, small_mask, prompt, n, preset, work)
        return pipe, args, mask is not None and loaded.kind == "instruct"
    assert isinstance(preset, FamilyPreset)
    return _family_args(loaded, small, small_mask, prompt, n, preset, work)


def _sd_args(
    loaded: LoadedModel,
    small: Image.Image,
    mask: Image.Image | None,
    prompt: str,
    n: int,
    params: PresetParams,
    work: tuple[int, int],
) -> tuple[Any, dict[str, Any]]:
    # The image, mask and prompt go in n times (one per variant) rather than once with
    # num_images_per_prompt=n: SD's inpainting pipeline encodes a single image with the first
    # generator only, which would tie every variant's latents to variant 0's seed. For the
    # pipelines it knows, `share_batch_work` then encodes them once for all variants.
    args: dict[str, Any] = {
        "prompt": [prompt] * n,
        "image": [small] * n,
        "num_images_per_prompt": 1,
        "guidance_scale": params.guidance_scale,
        "output_type": "pil",
    }
    if loaded.kind == "instruct":
        args["num_inference_steps"] = params.steps
        args["image_guidance_scale"] = params.image_guidance_scale
        return loaded.main, args
    args["width"], args["height"] = work
    if mask is None and loaded.img2img is not None:
        args["strength"] = params.strength
        args["num_inference_steps"] = steps_for(params.steps, params.strength)
        return loaded.img2img, args
    if mask is None:  # an inpainting checkpoint without a mask: repaint everywhere, gently
        mask = Image.new("L", work, 255)
        strength = params.strength
    else:
        strength = params.inpaint_strength
    args["mask_image"] = [mask] * n
    args["strength"] = strength
    args["num_inference_steps"] = steps_for(params.steps, strength)
    return loaded.inpaint, args


def _family_args(
    loaded: LoadedModel,
    small: Image.Image,
    mask: Image.Image | None,
    prompt: str,
    n: int,
    preset: FamilyPreset,
    work: tuple[int, int],
) -> tuple[Any, dict[str, Any], bool]:
    family = loaded.family
    width, height = work
    args: dict[str, Any] = {
        "prompt": prompt,
        "image": small,
        "num_images_per_prompt": n,
        "width": width,
        "height": height,
        "output_type": "pil",
    }
    paste = False
    if mask is not None and (loaded.inpaint is not None or family.needs_mask):
        pipe = loaded.inpaint if loaded.inpaint is not None else loaded.main
        args["mask_image"] = mask
        args["strength"] = preset.mask_strength
        args["num_inference_steps"] = steps_for(preset.steps, preset.mask_strength)
    elif family.needs_mask:
        raise InvalidInput(
            f"mask is required: the model {loaded.model!r} ({family.title}) repaints only what "
            "a mask marks; send a mask (white = repaint), or configure an instruction model as "
            "OPENEDITS_DIFFUSERS_MODEL and this one as OPENEDITS_DIFFUSERS_MASK_MODEL"
        )
    else:
        pipe = loaded.main
        args["num_inference_steps"] = preset.steps
        paste = mask is not None
    params = _parameters(pipe)
    if "image_reference" in params and family.key.startswith("flux2"):
        # klein's inpainting takes the instruction's context from a reference image.
        args["image_reference"] = small
    if "true_cfg_scale" in params:
        args["true_cfg_scale"] = preset.true_cfg_scale
        if preset.true_cfg_scale > 1.0:
            args["negative_prompt"] = family.negative_prompt or " "
    if not family.key.startswith("qwen"):
        # Qwen's transformer takes no guidance embedding; passing one only draws a warning.
        args["guidance_scale"] = preset.guidance_scale
    if type(pipe).__name__ in _SAMPLES_IMAGE_LATENTS:
        # These sample the image's latents with the generators, one image for all variants
        # drawing from generator 0 only; n copies give each variant its own draws, in the order
        # a single-variant call makes them, so a variant still reproduces alone.
        args.update(prompt=[prompt] * n, image=[small] * n, num_images_per_prompt=1)
        args["mask_image"] = [mask] * n
    if family.max_area_arg:
        # Kontext rescales toward max_area and snaps the image to its preferred buckets unless
        # told otherwise; the engine has already sized the image to the family's area.
        args["max_area"] = width * height
        args["_auto_resize"] = False
    return pipe, args, paste


def _parameters(pipe: Any) -> set[str]:
    return set(inspect.signature(type(pipe).__call__).parameters)
