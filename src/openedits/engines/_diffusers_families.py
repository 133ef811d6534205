"""Which edit model a checkpoint is, and how to run it well (private to the diffusers engine).

A checkpoint's `model_index.json` names its pipeline class (`_class_name`); that class decides
the family. Each family says which class loads it (AutoPipeline refuses most of these), which
inpainting sibling `from_pipe` derives from it for masked requests (sharing the weights), whether
a mask is required, the area and multiples it runs at, which step caches work on it, and the
presets that give good results with no tuning. Presets are per `mode`, and why:

- Qwen-Image-Edit: 50 steps and `true_cfg_scale` 4.0 are the pipeline's defaults and the model
  card's; 30 keeps nearly all the quality, 20 is a usable draft. True CFG needs a negative prompt,
  so the engine sends a blank one. The 2509/2511 (Plus) cards use 40 steps, true CFG 4.0.
- FLUX.2 klein (distilled, the published 4B/9B): 4 steps at guidance 1.0 is what it was distilled
  for; more steps add little. Its base (undistilled) checkpoints want ~50 steps at guidance 4.0.
- FLUX.1 Kontext [dev]: 28 steps, guidance 2.5 (the card's example); 16 is a quick draft.
- FLUX.1 Fill [dev]: guidance 30 is its own (distilled guidance, not CFG); 30-50 steps.

All of them run on FlowMatch Euler, the scheduler they ship with and were distilled for; the
engine keeps it (swapping it would void the step counts above). SD-family checkpoints keep the
engine's DPM-Solver++ presets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "FAMILIES",
    "SD_FAMILY",
    "Family",
    "FamilyPreset",
    "family_for",
]

Guidance = Literal["cfg", "true_cfg", "flux"]
Cache = Literal["first-block", "taylorseer"]


@dataclass(frozen=True)
class FamilyPreset:
    """What a `mode` means to one family's pipeline."""

    steps: int
    guidance_scale: float
    true_cfg_scale: float = 1.0
    """Qwen's (and Kontext's optional) real classifier-free guidance; 1.0 is off."""
    mask_strength: float = 1.0
    """Masked requests on the inpainting sibling: 1.0 repaints the masked region from noise."""


@dataclass(frozen=True)
class Family:
    """One family of edit checkpoints and how the engine runs it."""

    key: str
    title: str
    classes: tuple[str, ...]
    """`_class_name` values in model_index.json that mean this family."""
    pipeline: str
    """The diffusers class that loads the checkpoint."""
    inpaint: str | None = None
    """The inpainting sibling derived with from_pipe for masked requests (None: paste back)."""
    needs_mask: bool = False
    """The main pipeline only inpaints (FLUX.1 Fill)."""
    instruction: bool = True
    native_area: int = 1024 * 1024
    multiple: int = 16
    """VAE factor 8 times the transformer's 2x2 patches."""
    min_side: int = 0
    """The pipeline refuses images with a shorter side (FLUX.2's image processor: 64)."""
    caches: frozenset[str] = frozenset()
    cache_context: bool = False
    """The call must run inside `transformer.cache_context` for a step cache to work."""
    negative_prompt: str | None = None
    """Sent when true CFG is on (Qwen needs a negative prompt for it to take effect)."""
    max_area_arg: bool = False
    """The pipeline rescales toward `max_area` unless told the work area (Kontext)."""
    presets: dict[str, FamilyPreset] = field(default_factory=dict)

    @property
    def sd(self) -> bool:
        """Whether this is the Stable Diffusion family (UNet checkpoints, AutoPipeline)."""
        return self.key == "sd"


def _modes(turbo: FamilyPreset, fast: FamilyPreset, relax: FamilyPreset) -> dict[str, FamilyPreset]:
    return {"turbo": turbo, "fast": fast, "relax": relax}


QWEN_EDIT = Family(
    key="qwen-edit",
    title="Qwen-Image-Edit",
    classes=("QwenImageEditPipeline", "QwenImageEditInpaintPipeline"),
    pipeline="QwenImageEditPipeline",
    inpaint="QwenImageEditInpaintPipeline",
    caches=frozenset({"first-block", "taylorseer"}),
    negative_prompt=" ",
    presets=_modes(
        FamilyPreset(20, 1.0, true_cfg_scale=4.0),
        FamilyPreset(30, 1.0, true_cfg_scale=4.0),
        FamilyPreset(50, 1.0, true_cfg_scale=4.0),
    ),
)
QWEN_EDIT_PLUS = Family(
    key="qwen-edit-plus",
    title="Qwen-Image-Edit-2509/2511",
    classes=("QwenImageEditPlusPipeline",),
    pipeline="QwenImageEditPlusPipeline",
    caches=frozenset({"first-block", "taylorseer"}),
    negative_prompt=" ",
    presets=_modes(
        FamilyPreset(20, 1.0, true_cfg_scale=4.0),
        FamilyPreset(30, 1.0, true_cfg_scale=4.0),
        FamilyPreset(40, 1.0, true_cfg_scale=4.0),
    ),
)
FLUX2_KLEIN = Family(
    key="flux2-klein",
    title="FLUX.2 [klein]",
    classes=("Flux2KleinPipeline", "Flux2KleinInpaintPipeline"),
    pipeline="Flux2KleinPipeline",
    inpaint="Flux2KleinInpaintPipeline",
    # First-block cache crashes inside diffusers' hook on klein (a TypeError); TaylorSeer works.
    caches=frozenset({"taylorseer"}),
    min_side=64,
    presets=_modes(FamilyPreset(4, 1.0), FamilyPreset(4, 1.0), FamilyPreset(8, 1.0)),
)
FLUX2_KLEIN_BASE = Family(
    key="flux2-klein-base",
    title="FLUX.2 [klein] base (undistilled)",
    classes=(),
    pipeline="Flux2KleinPipeline",
    inpaint="Flux2KleinInpaintPipeline",
    caches=frozenset({"taylorseer"}),
    min_side=64,
    presets=_modes(FamilyPreset(20, 4.0), FamilyPreset(28, 4.0), FamilyPreset(50, 4.0)),
)
FLUX_KONTEXT = Family(
    key="flux-kontext",
    title="FLUX.1 Kontext",
    classes=("FluxKontextPipeline", "FluxKontextInpaintPipeline"),
    pipeline="FluxKontextPipeline",
    inpaint="FluxKontextInpaintPipeline",
    caches=frozenset({"first-block", "taylorseer"}),
    cache_context=True,
    max_area_arg=True,
    presets=_modes(FamilyPreset(16, 2.5), FamilyPreset(28, 2.5), FamilyPreset(40, 2.5)),
)
FLUX_FILL = Family(
    key="flux-fill",
    title="FLUX.1 Fill",
    classes=("FluxFillPipeline",),
    pipeline="FluxFillPipeline",
    needs_mask=True,
    instruction=False,
    caches=frozenset({"first-block", "taylorseer"}),
    cache_context=True,
    presets=_modes(FamilyPreset(20, 30.0), FamilyPreset(30, 30.0), FamilyPreset(50, 30.0)),
)
SD_FAMILY = Family(
    key="sd",
    title="Stable Diffusion (1.5/2/XL, inpainting, InstructPix2Pix)",
    classes=(),
    pipeline="AutoPipelineForInpainting",
    instruction=False,
    native_area=512 * 512,
    multiple=8,
)

FAMILIES: tuple[Family, ...] = (
    QWEN_EDIT,
    QWEN_EDIT_PLUS,
    FLUX2_KLEIN,
    FLUX2_KLEIN_BASE,
    FLUX_KONTEXT,
    FLUX_FILL,
    SD_FAMILY,
)


def family_for(config: dict[str, object]) -> Family:
    """The family of a checkpoint from its model_index.json; SD for everything else."""
    class_name = str(config.get("_class_name", ""))
    for family in FAMILIES:
        if class_name in family.classes:
            if family is FLUX2_KLEIN and not config.get("is_distilled", False):
                return FLUX2_KLEIN_BASE
            return family
    return SD_FAMILY
