"""Memory and speed settings: parsed, and refused with a clear sentence where they cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest

from openedits.engines._diffusers_families import (
    FLUX2_KLEIN,
    FLUX2_KLEIN_BASE,
    FLUX_FILL,
    QWEN_EDIT,
    QWEN_EDIT_PLUS,
    SD_FAMILY,
    family_for,
)
from openedits.engines._diffusers_options import Lora, SpeedOptions, check_options, parse_loras
from openedits.engines.diffusers import DiffusersEngine
from openedits.errors import EngineUnavailable
from openedits.settings import Settings

torch = pytest.importorskip("torch")


def test_family_comes_from_the_class_name() -> None:
    assert family_for({"_class_name": "QwenImageEditPipeline"}) is QWEN_EDIT
    assert family_for({"_class_name": "QwenImageEditPlusPipeline"}) is QWEN_EDIT_PLUS
    assert family_for({"_class_name": "FluxFillPipeline"}) is FLUX_FILL
    klein = {"_class_name": "Flux2KleinPipeline", "is_distilled": True}
    assert family_for(klein) is FLUX2_KLEIN
    assert family_for({**klein, "is_distilled": False}) is FLUX2_KLEIN_BASE
    assert family_for({"_class_name": "StableDiffusionInpaintPipeline"}) is SD_FAMILY
    assert family_for({}) is SD_FAMILY


@pytest.mark.parametrize(
    ("options", "family", "words"),
    [
        (SpeedOptions(offload="model"), QWEN_EDIT, r"OFFLOAD='model'.*device is 'cpu'.*none"),
        (SpeedOptions(offload="group"), QWEN_EDIT, r"OFFLOAD='group'.*possible here: none"),
        (SpeedOptions(quantization="nf4"), QWEN_EDIT, r"QUANTIZATION='nf4'.*bitsandbytes.*cpu"),
        (SpeedOptions(quantization="fp8"), FLUX2_KLEIN, r"QUANTIZATION='fp8'.*CUDA.*8\.9"),
        (SpeedOptions(quantization="int8"), QWEN_EDIT, r"QUANTIZATION='int8'.*torchao"),
        (SpeedOptions(quantization="nf4"), SD_FAMILY, r"QUANTIZATION='nf4'.*transformer famil"),
        (SpeedOptions(cache="first-block"), FLUX2_KLEIN, r"CACHE='first-block'.*possible.*taylor"),
        (SpeedOptions(cache="taylorseer"), SD_FAMILY, r"CACHE='taylorseer'.*Stable Diffusion"),
    ],
)
def test_impossible_settings_are_refused_by_name(
    options: SpeedOptions, family: object, words: str
) -> None:
    with pytest.raises(EngineUnavailable, match=words):
        check_options(torch, options, "cpu", family)  # type: ignore[arg-type]


def test_possible_settings_pass() -> None:
    check_options(torch, SpeedOptions(cache="taylorseer", compile=True), "cpu", FLUX2_KLEIN)
    check_options(torch, SpeedOptions(cache="first-block"), "cpu", QWEN_EDIT)


def test_float16_on_cpu_is_refused_at_load(tiny_sd: Path) -> None:
    engine = DiffusersEngine(tiny_sd, "cpu", dtype="float16")
    with pytest.raises(EngineUnavailable, match=r"DTYPE='float16' on cpu.*float32"):
        engine.load()
    assert not engine.loaded


def test_refusal_comes_before_any_weight_is_read(tiny_sd: Path) -> None:
    engine = DiffusersEngine(tiny_sd, "cpu", offload="sequential")
    with pytest.raises(EngineUnavailable, match="OPENEDITS_DIFFUSERS_OFFLOAD='sequential'"):
        engine.load()


def test_loras_parse_with_their_step_preset() -> None:
    (lightning,) = parse_loras(
        "lightx2v/Qwen-Image-Lightning?weight_name=Qwen-Image-Lightning-8steps-V1.1.safetensors"
    )
    assert lightning == Lora(
        "lightx2v/Qwen-Image-Lightning",
        "Qwen-Image-Lightning-8steps-V1.1.safetensors",
        1.0,
        8,
        1.0,
    )
    style, fast = parse_loras("/loras/style.safetensors?scale=0.7, /loras/x?steps=4&guidance=1.5")
    assert (style.scale, style.steps, style.guidance) == (0.7, None, None)
    assert (fast.steps, fast.guidance) == (4, 1.5)
    assert parse_loras("") == ()
    with pytest.raises(ValueError, match="unknown"):
        parse_loras("some/lora?strength=2")
    with pytest.raises(EngineUnavailable, match="steps a whole number"):
        DiffusersEngine("m", loras="some/lora?steps=four")


def test_settings_carry_the_options_to_the_engine() -> None:
    settings = Settings(
        diffusers_model="/models/kontext",
        diffusers_mask_model="/models/fill",
        diffusers_dtype="bfloat16",
        diffusers_offload="model",
        diffusers_quantization="nf4",
        diffusers_compile=True,
        diffusers_cache="first-block",
        diffusers_loras="a/b?steps=8",
    )
    engine = DiffusersEngine.from_settings(settings)
    assert engine.mask_model == "/models/fill"
    assert engine.options == SpeedOptions(
        "bfloat16", "model", "nf4", True, "first-block", (Lora("a/b", None, 1.0, 8, 1.0),)
    )
    with pytest.raises(ValueError, match="OPENEDITS_DIFFUSERS_MODEL too"):
        Settings(diffusers_mask_model="/models/fill")
