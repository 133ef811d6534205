"""The transformer edit families on tiny random-weight checkpoints: the contract, and routing.

Qwen-Image-Edit, Qwen-Image-Edit-Plus, FLUX.2 klein, FLUX.1 Kontext and FLUX.1 Fill, each built
once per session by `tiny_families`, saved, and loaded back through the engine's own loader with
the hub offline; 2 steps at 32 px. Each passes the engine contract with a mask and without one
(Fill: with one only, and refuses none).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

from openedits.engines.base import Engine, collecting_notes
from openedits.engines.diffusers import DiffusersEngine
from openedits.errors import InvalidInput
from tests.engines.contract import EngineContract, make_test_image, make_test_mask

pytest.importorskip("diffusers")

pytestmark = [
    pytest.mark.diffusers,
    pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument:UserWarning"),
]

PROMPT = "make it red"
STEPS = 2
SIZE = (32, 32)
FIXTURES = {
    "qwen-edit": "tiny_qwen_edit",
    "qwen-edit-plus": "tiny_qwen_edit_plus",
    "flux2-klein": "tiny_flux2_klein",
    "flux-kontext": "tiny_flux_kontext",
    "flux-fill": "tiny_flux_fill",
}


@cache
def warm(model: Path, mask_model: Path | None = None, **options: Any) -> DiffusersEngine:
    """One loaded engine per checkpoint (and options) for the session, as a server keeps it."""
    engine = DiffusersEngine(
        model, "cpu", mask_model=mask_model, steps=STEPS, work_size="input", **options
    )
    engine.load()
    return engine


class _FamilyContract(EngineContract):
    family: ClassVar[str]
    image_size: ClassVar[tuple[int, int]] = SIZE

    @pytest.fixture(autouse=True)
    def _model(self, request: pytest.FixtureRequest) -> None:
        self.model_dir = request.getfixturevalue(FIXTURES[self.family])

    def make_engine(self) -> Engine:
        return warm(self.model_dir)


def _contract(family: str, with_mask: bool) -> type[_FamilyContract]:
    name = "".join(p.title() for p in family.split("-"))
    return type(
        f"Test{name}{'Masked' if with_mask else 'Unmasked'}",
        (_FamilyContract,),
        {"family": family, "with_mask": with_mask, "__module__": __name__},
    )


for _family in FIXTURES:
    for _with_mask in (True, False):
        if _family == "flux-fill" and not _with_mask:
            continue  # Fill refuses unmasked edits: test_fill_refuses_no_mask
        _cls = _contract(_family, _with_mask)
        globals()[_cls.__name__] = _cls


# ---------------------------------------------------------------- detection and routing


@pytest.mark.parametrize(
    ("family", "pipeline", "inpaint"),
    [
        ("qwen-edit", "QwenImageEditPipeline", "QwenImageEditInpaintPipeline"),
        ("qwen-edit-plus", "QwenImageEditPlusPipeline", None),
        ("flux2-klein", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline"),
        ("flux-kontext", "FluxKontextPipeline", "FluxKontextInpaintPipeline"),
        ("flux-fill", "FluxFillPipeline", None),
    ],
)
def test_family_is_detected_and_inpainting_shares_the_weights(
    request: pytest.FixtureRequest, family: str, pipeline: str, inpaint: str | None
) -> None:
    engine = warm(request.getfixturevalue(FIXTURES[family]))
    slot = engine._main
    assert slot is not None
    assert engine.info().extra["pipeline"] == family
    assert type(slot.main).__name__ == pipeline
    if inpaint is None:
        assert slot.inpaint is None
        return
    assert type(slot.inpaint).__name__ == inpaint
    # from_pipe: the same module objects, so the weights are in memory once.
    assert slot.inpaint.transformer is slot.main.transformer
    assert slot.inpaint.vae is slot.main.vae


def _count_calls(monkeypatch: pytest.MonkeyPatch, pipe: Any) -> list[int]:
    calls: list[int] = []
    cls = type(pipe)
    real = cls.__call__

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counting)
    return calls


def test_masked_requests_run_the_inpainting_sibling(
    tiny_flux_kontext: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = warm(tiny_flux_kontext)
    assert engine._main is not None
    sibling = _count_calls(monkeypatch, engine._main.inpaint)
    image, mask = make_test_image(SIZE), make_test_mask(SIZE)
    engine.edit(image, None, PROMPT, n=1, seed=0, preset="turbo")
    assert sibling == []
    engine.edit(image, mask, PROMPT, n=1, seed=0, preset="turbo")
    assert sibling == [1]


def test_family_without_sibling_edits_and_pastes_back(tiny_qwen_edit_plus: Path) -> None:
    engine = warm(tiny_qwen_edit_plus)
    image, mask = make_test_image(SIZE), make_test_mask(SIZE)
    (variant,) = engine.edit(image, mask, PROMPT, n=1, seed=3, preset="turbo")
    changed = np.any(np.asarray(variant) != np.asarray(image), axis=-1)
    assert changed.any()
    assert not (changed & (np.asarray(mask) == 0)).any()


def test_fill_refuses_no_mask_before_loading(tiny_flux_fill: Path) -> None:
    image = make_test_image(SIZE)
    cold = DiffusersEngine(tiny_flux_fill, "cpu")
    with pytest.raises(InvalidInput, match=r"mask is required.*FLUX.1 Fill"):
        cold.validate(image, None, PROMPT)
    assert not cold.loaded
    engine = warm(tiny_flux_fill)
    assert engine.capabilities.needs_mask
    with pytest.raises(InvalidInput, match="mask is required"):
        engine.edit(image, None, PROMPT, n=4, seed=0, preset="fast")


@pytest.mark.parametrize("family", ["qwen-edit", "flux2-klein", "flux-fill"])
def test_each_variant_reproduces_alone(request: pytest.FixtureRequest, family: str) -> None:
    engine = warm(request.getfixturevalue(FIXTURES[family]))
    image, mask = make_test_image(SIZE), make_test_mask(SIZE)
    batched = engine.edit(image, mask, PROMPT, n=2, seed=50, preset="turbo")
    (second,) = engine.edit(image, mask, PROMPT, n=1, seed=51, preset="turbo")
    diff = np.abs(np.asarray(batched[1], np.int16) - np.asarray(second, np.int16)).max()
    assert diff <= 3  # float kernels differ with batch size, nothing else


def test_presets_are_the_familys_with_steps_overridden(tiny_flux2_klein: Path) -> None:
    engine = warm(tiny_flux2_klein)
    assert engine._main is not None
    presets = engine._main.family_presets
    assert {p.steps for p in presets.values()} == {STEPS}
    assert {p.guidance_scale for p in presets.values()} == {1.0}  # distilled klein: guidance 1
    # Kept aspect, raised to the 64 px the FLUX.2 image processor needs, the family's multiple.
    assert engine.work_size_for((33, 50)) == (64, 96)


# ---------------------------------------------------------------- a second model for masks


def test_mask_model_takes_masked_requests(
    tiny_flux_kontext: Path, tiny_flux_fill: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = warm(tiny_flux_kontext, tiny_flux_fill)
    info = engine.info()
    assert info.extra["mask_model"] == str(tiny_flux_fill)
    assert info.extra["mask_pipeline"] == "flux-fill"
    assert info.extra["pipeline"] == "flux-kontext"
    assert not engine.capabilities.needs_mask  # unmasked requests go to Kontext
    assert engine._masked is not None and engine._main is not None
    fill = _count_calls(monkeypatch, engine._masked.main)
    image, mask = make_test_image(SIZE), make_test_mask(SIZE)
    engine.edit(image, None, PROMPT, n=1, seed=0, preset="turbo")
    assert fill == []
    (variant,) = engine.edit(image, mask, PROMPT, n=1, seed=0, preset="turbo")
    assert fill == [1]
    keep = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(variant)[keep], np.asarray(image)[keep])


# ---------------------------------------------------------------- step caches


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "cache_kind"),
    [("flux-kontext", "first-block"), ("flux2-klein", "taylorseer"), ("qwen-edit", "first-block")],
)
def test_step_cache_runs_where_the_family_supports_it(
    request: pytest.FixtureRequest, family: str, cache_kind: str
) -> None:
    engine = warm(request.getfixturevalue(FIXTURES[family]), cache=cache_kind)
    assert f"cache={cache_kind}" in engine.info().extra["speed"]
    image, mask = make_test_image(SIZE), make_test_mask(SIZE)
    first = engine.edit(image, mask, PROMPT, n=2, seed=9, preset="turbo")
    again = engine.edit(image, mask, PROMPT, n=2, seed=9, preset="turbo")
    # The cache's state starts clean each call, so a seed still reproduces.
    assert [a.tobytes() for a in first] == [b.tobytes() for b in again]


# ---------------------------------------------------------------- out of memory


def test_out_of_memory_retries_once_with_memory_saving_and_says_so(
    tiny_flux_kontext: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = DiffusersEngine(tiny_flux_kontext, "cpu", steps=STEPS, work_size="input")
    engine.load()
    assert engine._main is not None and not engine._main.memory_saving_on
    cls = type(engine._main.main)
    real = cls.__call__
    calls: list[int] = []

    def oom_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", oom_once)
    image = make_test_image(SIZE)
    with collecting_notes() as notes:
        variants = engine.edit(image, None, PROMPT, n=2, seed=1, preset="turbo")
    assert len(variants) == 2 and len(calls) == 2
    assert len(notes) == 1 and "retried once with memory saving on" in notes[0]
    assert engine.info().extra["memory_saving"] == "on"


def test_image_only_qwen_processor_matches_the_tokens(tiny_qwen_edit: Path) -> None:
    from openedits.engines._diffusers_qwen import load_image_only_processor

    processor = load_image_only_processor(str(tiny_qwen_edit), local_files_only=True)
    image = Image.new("RGB", (28, 28), (10, 20, 30))
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[image],
                    return_tensors="pt")
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grid = out["image_grid_thw"][0]
    # One image token per 2x2 merge of 14-px patches, as Qwen2-VL's own processor expands it.
    assert int((out["input_ids"][0] == pad).sum()) == int(grid.prod()) // 4


# ---------------------------------------------------------------- LoRAs


def _tiny_lora(model: Path, folder: Path, weight_name: str) -> Path:
    """A random LoRA over the tiny Kontext transformer's attention, saved as diffusers does."""
    import torch
    from diffusers import FluxKontextPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = FluxKontextPipeline.from_pretrained(model)
    torch.manual_seed(0)
    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                   target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    FluxKontextPipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        weight_name=weight_name,
    )
    return folder


@pytest.mark.slow
def test_lora_is_fused_and_brings_its_step_preset(
    tiny_flux_kontext: Path, tmp_path: Path
) -> None:
    lora = _tiny_lora(tiny_flux_kontext, tmp_path / "lora", "tiny-Lightning-4steps.safetensors")
    engine = DiffusersEngine(
        tiny_flux_kontext, "cpu", steps=STEPS, work_size="input",
        loras=f"{lora}?weight_name=tiny-Lightning-4steps.safetensors",
    )
    engine.load()
    assert engine._main is not None
    presets = engine._main.family_presets
    assert {(p.steps, p.guidance_scale) for p in presets.values()} == {(4, 1.0)}
    assert "loras=" in engine.info().extra["speed"]
    base = warm(tiny_flux_kontext)._main
    assert base is not None
    block = engine._main.main.transformer.transformer_blocks[0].attn
    base_block = base.main.transformer.transformer_blocks[0].attn
    # Fused into the weights (no adapter left to slow each step down).
    assert not hasattr(block.to_q, "lora_A")
    assert not np.allclose(block.to_q.weight.detach().numpy(),
                           base_block.to_q.weight.detach().numpy())
    seen: list[float] = []
    engine.edit(make_test_image(SIZE), None, PROMPT, n=1, seed=0, preset="relax",
                on_progress=seen.append)
    assert len(seen) == 4
