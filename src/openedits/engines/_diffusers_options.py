"""Memory and speed settings of the diffusers engine, each one setting (private to the engine).

dtype, offload, quantization, `torch.compile` of the repeated blocks, step caching and LoRAs.
Every one is checked against the device and the family *before* any weight is read, and refused
with a message that names the setting, the value and what is possible here: a server configured
for something its hardware cannot do fails at start with that sentence, not mid-request.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

from openedits.engines._diffusers_families import Family
from openedits.errors import EngineUnavailable

__all__ = [
    "Dtype",
    "Lora",
    "Offload",
    "Quantization",
    "SpeedOptions",
    "StepCache",
    "apply_speed",
    "check_options",
    "parse_loras",
    "quantization_config",
    "resolve_dtype",
]

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Offload = Literal["none", "model", "sequential", "group"]
Quantization = Literal["none", "fp8", "int8", "nf4"]
StepCache = Literal["none", "first-block", "taylorseer"]

_STEPS_IN_NAME = re.compile(r"(\d+)[-_ ]?steps?", re.IGNORECASE)


@dataclass(frozen=True)
class Lora:
    """One LoRA to load onto the pipeline, and the step preset it brings (Lightning: 4 or 8)."""

    source: str
    """A local file or folder, or a hub id."""
    weight_name: str | None = None
    scale: float = 1.0
    steps: int | None = None
    """Every mode runs this many steps (distillation LoRAs are trained for one count)."""
    guidance: float | None = None
    """Every mode's guidance (true CFG for Qwen); step-distilled LoRAs want 1.0."""


@dataclass(frozen=True)
class SpeedOptions:
    """The memory and speed settings, as the engine is configured."""

    dtype: Dtype = "auto"
    offload: Offload = "none"
    quantization: Quantization = "none"
    compile: bool = False
    cache: StepCache = "none"
    loras: tuple[Lora, ...] = ()


def parse_loras(text: str | None) -> tuple[Lora, ...]:
    """Parse OPENEDITS_DIFFUSERS_LORAS: comma-separated `SOURCE[?weight_name=F&scale=S&steps=N]`.

    `steps` defaults to the count in the file name ("...-8steps-...") when there is one, and a
    LoRA with a step count runs at guidance 1.0 unless `guidance=` says otherwise.
    """
    loras: list[Lora] = []
    for raw in (text or "").split(","):
        entry = raw.strip()
        if not entry:
            continue
        source, _, query = entry.partition("?")
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        unknown = set(params) - {"weight_name", "scale", "steps", "guidance"}
        if unknown or not source:
            raise ValueError(
                f"OPENEDITS_DIFFUSERS_LORAS entry {entry!r}: expected SOURCE[?weight_name=FILE"
                f"&scale=1.0&steps=8&guidance=1.0]; unknown {sorted(unknown) or 'empty source'}"
            )
        weight_name = params.get("weight_name") or None
        try:
            scale = float(params.get("scale", "1.0"))
            steps = int(params["steps"]) if params.get("steps") else None
            guidance = float(params["guidance"]) if params.get("guidance") else None
        except ValueError as exc:
            raise ValueError(
                f"OPENEDITS_DIFFUSERS_LORAS entry {entry!r}: scale and guidance must be numbers "
                f"and steps a whole number ({exc})"
            ) from None
        if steps is None:
            match = _STEPS_IN_NAME.search(weight_name or source.rsplit("/", 1)[-1])
            steps = int(match.group(1)) if match else None
        if steps is not None and steps < 1:
            raise ValueError(f"OPENEDITS_DIFFUSERS_LORAS entry {entry!r}: steps must be >= 1")
        if steps is not None and guidance is None:
            guidance = 1.0
        loras.append(Lora(source, weight_name, scale, steps, guidance))
    return tuple(loras)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_dtype(torch: Any, options: SpeedOptions, device: str, family: Family) -> Any:
    """The torch dtype to load in: `auto` is bf16 on CUDA where supported (fp16 for SD)."""
    cuda = device.startswith("cuda")
    if options.dtype == "auto":
        if not cuda:
            return torch.float32
        if family.sd:
            return torch.float16  # SD checkpoints ship fp16 weights and were tuned in fp16
        # Flux and Qwen overflow in fp16; bf16 is what they were trained and released in.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if options.dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise EngineUnavailable(
            f"OPENEDITS_DIFFUSERS_DTYPE='bfloat16' but {device} does not support bf16 (GPUs "
            "before Ampere); possible here: float16 or float32"
        )
    if options.dtype == "float16" and device == "cpu":
        raise EngineUnavailable(
            "OPENEDITS_DIFFUSERS_DTYPE='float16' on cpu: many CPU kernels have no fp16 version; "
            "possible here: auto (float32), float32 or bfloat16"
        )
    return getattr(torch, options.dtype)


def check_options(torch: Any, options: SpeedOptions, device: str, family: Family) -> None:
    """Refuse settings this device or family cannot do, before any weight is read."""
    cuda = device.startswith("cuda")
    if options.offload != "none" and not cuda:
        raise EngineUnavailable(
            f"OPENEDITS_DIFFUSERS_OFFLOAD={options.offload!r} moves weights between CPU and GPU "
            f"memory, but the device is {device!r}; possible here: none"
        )
    if options.offload == "sequential" and options.compile:
        raise EngineUnavailable(
            "OPENEDITS_DIFFUSERS_OFFLOAD='sequential' streams each layer's weights in on every "
            "call, which OPENEDITS_DIFFUSERS_COMPILE=true cannot compile around; use offload "
            "model or group, or compile false"
        )
    _check_quantization(torch, options.quantization, device, family, cuda)
    if options.cache != "none" and options.cache not in family.caches:
        possible = ", ".join(sorted(family.caches)) or "none (this family's step caching fails)"
        raise EngineUnavailable(
            f"OPENEDITS_DIFFUSERS_CACHE={options.cache!r} does not work on {family.title}; "
            f"possible for it: {possible}"
        )
    if options.loras and not _has("peft"):
        raise EngineUnavailable(
            "OPENEDITS_DIFFUSERS_LORAS is set but loading a LoRA needs peft: pip install peft"
        )


def _check_quantization(
    torch: Any, quantization: str, device: str, family: Family, cuda: bool
) -> None:
    if quantization == "none":
        return
    name = f"OPENEDITS_DIFFUSERS_QUANTIZATION={quantization!r}"
    if family.sd:
        raise EngineUnavailable(
            f"{name}: quantization is for the transformer families (Qwen, FLUX); "
            f"{family.title} checkpoints fit in fp16; possible: none"
        )
    if quantization == "nf4":
        if not cuda:
            raise EngineUnavailable(
                f"{name} runs on bitsandbytes' CUDA kernels, but the device is {device!r}; "
                "possible here: none"
            )
        if not _has("bitsandbytes"):
            raise EngineUnavailable(f"{name} needs bitsandbytes: pip install bitsandbytes")
    elif quantization == "fp8":
        if not cuda:
            raise EngineUnavailable(
                f"{name} needs a CUDA GPU with fp8 support (compute capability 8.9+: Ada, "
                f"Hopper, Blackwell), but the device is {device!r}; possible here: none"
            )
        if not _has("torchao"):
            raise EngineUnavailable(f"{name} needs torchao: pip install torchao")
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        if (major, minor) < (8, 9):
            raise EngineUnavailable(
                f"{name} needs compute capability 8.9+ but {device} has {major}.{minor}; "
                "possible here: int8 or nf4"
            )
    elif quantization == "int8":
        if _has("torchao"):
            return  # torchao's int8 weight-only runs on CPU and GPU
        if not cuda:
            raise EngineUnavailable(
                f"{name} needs torchao on {device!r} (bitsandbytes' int8 is CUDA only): "
                "pip install torchao, or use none"
            )
        if not _has("bitsandbytes"):
            raise EngineUnavailable(f"{name} needs torchao or bitsandbytes: pip install torchao")


def _text_encoder(family: Family) -> str:
    # The large text encoder: Qwen2.5-VL / Qwen3 for Qwen and klein, T5-XXL for FLUX.1.
    return "text_encoder_2" if family.key in ("flux-kontext", "flux-fill") else "text_encoder"


def quantization_config(diffusers: Any, options: SpeedOptions, family: Family) -> Any | None:
    """diffusers' PipelineQuantizationConfig for the setting: the transformer and text encoder."""
    quantization = options.quantization
    if quantization == "none":
        return None
    components = ["transformer", _text_encoder(family)]
    if quantization == "nf4":
        return diffusers.PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit",
            quant_kwargs={
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_compute_dtype": _compute_dtype(options),
            },
            components_to_quantize=components,
        )
    if quantization == "int8" and not _has("torchao"):
        return diffusers.PipelineQuantizationConfig(
            quant_backend="bitsandbytes_8bit",
            quant_kwargs={"load_in_8bit": True},
            components_to_quantize=components,
        )
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    # torchao quantizes the transformer, where the time goes; the text encoder runs once a call.
    config = Float8WeightOnlyConfig() if quantization == "fp8" else Int8WeightOnlyConfig()
    return diffusers.PipelineQuantizationConfig(
        quant_mapping={"transformer": diffusers.TorchAoConfig(config)}
    )


def _compute_dtype(options: SpeedOptions) -> Any:
    import torch

    return torch.float16 if options.dtype == "float16" else torch.bfloat16


def apply_speed(
    diffusers: Any, pipe: Any, options: SpeedOptions, device: str, family: Family
) -> list[str]:
    """Offload, step cache and compile on a loaded pipeline; what was turned on, in words.

    Called instead of `pipe.to(device)`: with offload the pipeline manages its own placement.
    """
    applied: list[str] = []
    if options.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
        applied.append("offload=model")
    elif options.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
        applied.append("offload=sequential")
    elif options.offload == "group":
        import torch

        pipe.enable_group_offload(
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=True,
        )
        applied.append("offload=group")
    else:
        pipe.to(device)
    denoiser: Any = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if options.cache == "first-block":
        # 0.2: ParaAttention's FLUX figure (26 s to 17 s at 28 steps) with little visible loss.
        denoiser.enable_cache(diffusers.FirstBlockCacheConfig(threshold=0.2))
        applied.append("cache=first-block")
    elif options.cache == "taylorseer":
        denoiser.enable_cache(
            diffusers.TaylorSeerCacheConfig(cache_interval=5, disable_cache_before_step=3)
        )
        applied.append("cache=taylorseer")
    if options.compile:
        # Regional compilation: the repeated blocks compile once and are reused, so start-up
        # costs seconds, not the minutes a whole-model compile does.
        denoiser.compile_repeated_blocks(fullgraph=True)
        applied.append("compile=repeated-blocks")
    return applied
