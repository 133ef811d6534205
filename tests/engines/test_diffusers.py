"""The diffusers engine on tiny random-weight pipelines: the engine contract, and what is its own.

Every model here is built by `tiny_diffusers`, saved with `save_pretrained` and loaded back through
the engine's real `from_pretrained` code with the hub offline. 2 denoising steps, 64-128 px images.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from openedits.engines.base import Engine
from openedits.engines.diffusers import DiffusersEngine
from openedits.errors import EngineFailed, EngineUnavailable, InvalidInput, TaskCancelled
from openedits.settings import Settings
from tests.engines.contract import EngineContract, make_test_image, make_test_mask

pytest.importorskip("diffusers")

pytestmark = [
    pytest.mark.diffusers,
    # diffusers' DPM-Solver builds a numpy array from a torch tensor the numpy-1 way; numpy 2
    # warns about it. Harmless, upstream, and nothing else is silenced.
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
    # diffusers' hub lookup still passes an argument huggingface_hub 1.x deprecated.
    pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument:UserWarning"),
]

PROMPT = "a red apple"
STEPS = 2


@cache
def warm_engine(model: Path, work_size: str = "native") -> DiffusersEngine:
    """One loaded engine per model for the whole module, as a server keeps it warm."""
    engine = DiffusersEngine(model, "cpu", steps=STEPS, work_size=work_size)  # type: ignore[arg-type]
    engine.load()
    return engine


def pixels(image: Image.Image) -> np.ndarray[Any, np.dtype[np.int16]]:
    return np.asarray(image).astype(np.int16)


class TestDiffusersEngine(EngineContract):
    """The shared contract, with a mask (inpainting on a 4-channel checkpoint)."""

    @pytest.fixture(autouse=True)
    def _model(self, tiny_sd: Path) -> None:
        self.model_dir = tiny_sd

    def make_engine(self) -> Engine:
        return warm_engine(self.model_dir)


# ---------------------------------------------------------------- pipelines


def test_image_to_image_without_mask(tiny_sd: Path) -> None:
    engine = warm_engine(tiny_sd)
    image = make_test_image((96, 64))
    variants = engine.edit(image, None, PROMPT, n=4, seed=5, preset="fast")
    assert engine.info().extra["pipeline"] == "text2img"
    assert [v.size for v in variants] == [image.size] * 4
    assert len({v.tobytes() for v in variants}) == 4
    assert all(v.tobytes() != image.tobytes() for v in variants)


def test_inpainting_checkpoint_with_and_without_mask(tiny_inpaint: Path) -> None:
    engine = warm_engine(tiny_inpaint)
    image, mask = make_test_image((64, 64)), make_test_mask((64, 64))
    keep = np.asarray(mask) == 0
    masked = engine.edit(image, mask, PROMPT, n=2, seed=1, preset="turbo")
    assert engine.info().extra["pipeline"] == "inpaint"
    for v in masked:
        assert np.array_equal(np.asarray(v)[keep], np.asarray(image)[keep])
    # No mask: an inpainting UNet repaints everywhere (over a full mask), still at the input's size.
    whole = engine.edit(image, None, PROMPT, n=2, seed=1, preset="turbo")
    assert [v.size for v in whole] == [image.size] * 2
    assert whole[0].tobytes() != image.tobytes()


def test_instruct_pix2pix_is_detected_and_mask_limits_it(tiny_pix2pix: Path) -> None:
    engine = warm_engine(tiny_pix2pix)
    image, mask = make_test_image((64, 64)), make_test_mask((64, 64))
    whole = engine.edit(image, None, "make it red", n=2, seed=3, preset="fast")
    assert engine.info().extra["pipeline"] == "instruct"
    assert whole[0].tobytes() != whole[1].tobytes()
    keep = np.asarray(mask) == 0
    for v in engine.edit(image, mask, "make it red", n=2, seed=3, preset="fast"):
        assert np.array_equal(np.asarray(v)[keep], np.asarray(image)[keep])


# ---------------------------------------------------------------- seeds, sizes, fidelity


@pytest.mark.parametrize("with_mask", [True, False], ids=["inpaint", "img2img"])
def test_batched_call_equals_each_seed_alone(tiny_sd: Path, with_mask: bool) -> None:
    engine = warm_engine(tiny_sd)
    image = make_test_image((64, 64))
    mask = make_test_mask((64, 64)) if with_mask else None
    batched = engine.edit(image, mask, PROMPT, n=4, seed=100, preset="turbo")
    for i, variant in enumerate(batched):
        (alone,) = engine.edit(image, mask, PROMPT, n=1, seed=100 + i, preset="turbo")
        # Same noise, same latents; only the float kernels differ with batch size (at most a
        # couple of 8-bit levels on CPU).
        assert np.abs(pixels(variant) - pixels(alone)).max() <= 3, f"variant {i}"


def test_odd_size_is_rounded_for_the_model_and_restored(tiny_sd: Path) -> None:
    engine = warm_engine(tiny_sd, "input")
    image, mask = make_test_image((77, 53)), make_test_mask((77, 53))
    assert engine.work_size_for(image.size) == (80, 56)
    variants = engine.edit(image, mask, PROMPT, n=1, seed=0, preset="turbo")
    assert variants[0].size == (77, 53)
    keep = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(variants[0])[keep], np.asarray(image)[keep])


def test_feather_stays_inside_the_mask(tiny_sd: Path) -> None:
    engine = warm_engine(tiny_sd)
    image, mask = make_test_image((64, 64)), make_test_mask((64, 64))
    (variant,) = engine.edit(image, mask, PROMPT, n=1, seed=2, preset="turbo")
    changed = np.any(np.asarray(variant) != np.asarray(image), axis=-1)
    assert changed.any()
    assert not (changed & (np.asarray(mask) == 0)).any()


def test_soft_mask_values_below_half_are_kept(tiny_sd: Path) -> None:
    engine = warm_engine(tiny_sd)
    image = make_test_image((64, 64))
    mask = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)), "L")
    (variant,) = engine.edit(image, mask, PROMPT, n=1, seed=2, preset="turbo")
    keep = np.asarray(mask) < 128
    assert np.array_equal(np.asarray(variant)[keep], np.asarray(image)[keep])


# ---------------------------------------------------------------- progress and cancel


def test_progress_is_reported_once_per_denoising_step(tiny_sd: Path) -> None:
    engine = warm_engine(tiny_sd)
    image, mask = make_test_image((64, 64)), make_test_mask((64, 64))
    for m in (mask, None):  # inpainting (strength 1) and img2img (strength < 1) alike
        seen: list[float] = []
        engine.edit(image, m, PROMPT, n=1, seed=0, preset="fast", on_progress=seen.append)
        assert seen == [pytest.approx((i + 1) / STEPS) for i in range(STEPS)]


def test_cancel_stops_at_the_next_step_and_leaves_the_pipeline_usable(tiny_sd: Path) -> None:
    engine = warm_engine(tiny_sd)
    image, mask = make_test_image((64, 64)), make_test_mask((64, 64))
    before = engine.edit(image, mask, PROMPT, n=2, seed=11, preset="turbo")
    seen: list[float] = []
    with pytest.raises(TaskCancelled, match="step 1 of 2"):
        engine.edit(
            image,
            mask,
            PROMPT,
            n=2,
            seed=11,
            preset="turbo",
            on_progress=seen.append,
            should_cancel=lambda: bool(seen),
        )
    assert seen == [pytest.approx(0.5)]
    after = engine.edit(image, mask, PROMPT, n=2, seed=11, preset="turbo")
    assert [a.tobytes() for a in after] == [b.tobytes() for b in before]


def test_cancel_before_start_loads_nothing(tmp_path: Path) -> None:
    engine = DiffusersEngine(tmp_path / "absent", "cpu")
    with pytest.raises(TaskCancelled):
        engine.edit(
            make_test_image((64, 64)),
            None,
            PROMPT,
            n=1,
            seed=0,
            preset="fast",
            should_cancel=lambda: True,
        )
    assert not engine.info().loaded


# ---------------------------------------------------------------- loading and failures


def test_missing_model_folder_is_unavailable(tmp_path: Path) -> None:
    engine = DiffusersEngine(tmp_path / "no-such-model", "cpu")
    with pytest.raises(EngineUnavailable, match="not found"):
        engine.load()
    with pytest.raises(EngineUnavailable, match="OPENEDITS_DIFFUSERS_MODEL"):
        DiffusersEngine(None).load()


def test_hub_id_offline_and_not_cached_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # The engine follows the hub's own offline switch (HF_HUB_OFFLINE, read at hub import).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    engine = DiffusersEngine("openedits-tests/not-a-model", "cpu")
    with pytest.raises(EngineUnavailable, match=r"offline.*model_index\.json"):
        engine.load()


def test_broken_weights_are_unavailable(tiny_sd: Path, tmp_path: Path) -> None:
    import shutil

    broken = shutil.copytree(tiny_sd, tmp_path / "broken")
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    with pytest.raises(EngineUnavailable, match="could not load"):
        DiffusersEngine(broken, "cpu").load()


def test_validate_needs_no_weights(tmp_path: Path) -> None:
    engine = DiffusersEngine(tmp_path / "absent", "cpu")
    image = make_test_image((64, 64))
    engine.validate(image, None, PROMPT)
    engine.validate(image, make_test_mask((64, 64)), PROMPT)
    with pytest.raises(InvalidInput, match="prompt"):
        engine.validate(image, None, "  ")
    with pytest.raises(InvalidInput, match="selects nothing"):
        engine.validate(image, Image.new("L", image.size, 0), PROMPT)
    with pytest.raises(InvalidInput, match="mode"):
        engine.validate(image, Image.new("RGB", image.size), PROMPT)
    assert not engine.info().loaded


def test_concurrent_first_requests_load_once(
    tiny_sd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusers

    calls: list[str] = []
    real = diffusers.AutoPipelineForInpainting.from_pretrained

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusers.AutoPipelineForInpainting, "from_pretrained", counting)
    engine = DiffusersEngine(tiny_sd, "cpu", steps=STEPS)
    threads = [threading.Thread(target=engine.load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert engine.info().loaded


def test_pipeline_error_fails_the_task_and_engine_recovers(
    tiny_sd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its own engine: the out-of-memory retry turns memory saving on for good.
    engine = DiffusersEngine(tiny_sd, "cpu", steps=STEPS)
    engine.load()
    image, mask = make_test_image((64, 64)), make_test_mask((64, 64))
    pipe_cls = type(engine._inpaint)
    calls: list[int] = []

    def oom(self: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(pipe_cls, "__call__", oom)
        with pytest.raises(EngineFailed, match=r"out of memory on cpu.*even with memory saving"):
            engine.edit(image, mask, PROMPT, n=4, seed=0, preset="turbo")
    assert len(calls) == 2  # tried, then retried once with memory saving on
    assert engine.info().extra["memory_saving"] == "on"
    assert len(engine.edit(image, mask, PROMPT, n=1, seed=0, preset="turbo")) == 1


def test_from_settings_and_info(tiny_sd: Path) -> None:
    settings = Settings(engine="diffusers", diffusers_model=str(tiny_sd), device="cpu")
    engine = DiffusersEngine.from_settings(settings)
    info = engine.info()
    assert (info.name, info.device, info.model, info.loaded) == (
        "diffusers",
        "cpu",
        str(tiny_sd),
        False,
    )
    engine.load()
    info = engine.info()
    assert info.loaded
    assert info.extra == {"dtype": "float32", "pipeline": "text2img", "memory_saving": "off"}


def test_module_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None\n"
        "from openedits.engines.diffusers import DiffusersEngine\n"
        "from openedits.errors import EngineUnavailable\n"
        "from PIL import Image\n"
        "e = DiffusersEngine('some/model', 'cpu')\n"
        "e.validate(Image.new('RGB', (8, 8)), None, 'x')\n"
        "try:\n    e.load()\nexcept EngineUnavailable as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'openedits[diffusers]'" in out.stdout


# ---------------------------------------------------------------- work shared by the variants


@pytest.fixture
def forward_counts(monkeypatch: pytest.MonkeyPatch) -> Any:
    handles: list[Any] = []

    def count(*modules: Any) -> list[int]:
        """Count from now on, and stop the counting asked for before."""
        while handles:
            handles.pop().remove()
        counts = [0] * len(modules)
        for i, module in enumerate(modules):

            def bump(*_args: Any, _i: int = i) -> None:
                counts[_i] += 1

            handles.append(module.register_forward_hook(bump))
        return counts

    yield count
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize(
    ("checkpoint", "with_mask", "vae_encodes"),
    [
        ("tiny_sd", True, 1),  # inpaint, 4-channel UNet: the image, once
        ("tiny_sd", False, 1),  # img2img: the image, once
        ("tiny_inpaint", True, 1),  # 9-channel UNet at strength 1: the masked image, once
        ("tiny_inpaint", False, 2),  # 9-channel UNet, no mask: the image and the masked image
        ("tiny_pix2pix", False, 1),
    ],
)
def test_batched_call_encodes_prompt_and_image_once(
    request: pytest.FixtureRequest,
    forward_counts: Any,
    checkpoint: str,
    with_mask: bool,
    vae_encodes: int,
) -> None:
    engine = warm_engine(request.getfixturevalue(checkpoint))
    pipe = engine._instruct or engine._inpaint  # img2img shares the inpainting pipe's modules
    image = make_test_image((64, 64))
    mask = make_test_mask((64, 64)) if with_mask else None
    seen: dict[int, list[int]] = {}
    for n in (1, 4):
        counts = forward_counts(pipe.text_encoder, pipe.vae.encoder, pipe.vae.decoder, pipe.unet)
        engine.edit(image, mask, PROMPT, n=n, seed=7, preset="turbo")
        seen[n] = counts
    # The prompt (and the empty negative prompt guidance needs) and the image are encoded once
    # whatever n is; only the denoising and the decoding run per variant, and still as one batch.
    text, encoder, decoder, unet = seen[4]
    assert text == seen[1][0] <= 2
    assert encoder == seen[1][1] == vae_encodes
    assert decoder == 1
    assert unet == seen[1][3] == STEPS


@pytest.mark.parametrize("checkpoint", ["tiny_inpaint", "tiny_pix2pix"])
def test_each_seed_alone_on_inpainting_and_instruct_checkpoints(
    request: pytest.FixtureRequest, checkpoint: str
) -> None:
    engine = warm_engine(request.getfixturevalue(checkpoint))
    image, mask = make_test_image((64, 64)), make_test_mask((64, 64))
    for m in (mask, None):
        batched = engine.edit(image, m, PROMPT, n=2, seed=40, preset="turbo")
        for i, variant in enumerate(batched):
            (alone,) = engine.edit(image, m, PROMPT, n=1, seed=40 + i, preset="turbo")
            assert np.abs(pixels(variant) - pixels(alone)).max() <= 3, f"variant {i}"


@pytest.mark.parametrize("with_mask", [True, False], ids=["inpaint", "img2img"])
def test_shared_work_gives_what_the_pipeline_gives_alone(
    tiny_sd: Path, monkeypatch: pytest.MonkeyPatch, with_mask: bool
) -> None:
    from openedits.engines import _diffusers_run as module

    engine = warm_engine(tiny_sd)
    image = make_test_image((64, 64))
    mask = make_test_mask((64, 64)) if with_mask else None
    shared = engine.edit(image, mask, PROMPT, n=3, seed=21, preset="turbo")
    # The pipeline left to encode every copy itself draws the same random numbers in the same
    # order, so the results agree up to float noise.
    monkeypatch.setattr(module, "share_batch_work", lambda _torch, _pipe, kwargs: kwargs)
    copies = engine.edit(image, mask, PROMPT, n=3, seed=21, preset="turbo")
    for a, b in zip(shared, copies, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 3


def test_unknown_pipelines_get_their_arguments_unchanged() -> None:
    import torch

    from openedits.engines._diffusers_batch import share_batch_work

    class SomePipeline:
        vae = None

    kwargs = {"prompt": [PROMPT] * 2, "image": [make_test_image((64, 64))] * 2, "generator": [1, 2]}
    assert share_batch_work(torch, SomePipeline(), kwargs) is kwargs


def test_paste_back_in_the_masks_box_equals_the_whole_frame_blend() -> None:
    from openedits.engines._diffusers_batch import feathered_alpha, paste_back

    original, edited = make_test_image((96, 64)), make_test_image((96, 64)).rotate(90)
    for mask in (make_test_mask((96, 64)), Image.new("L", (96, 64), 255)):
        alpha = feathered_alpha(mask, 4)
        orig = np.asarray(original)
        whole = orig + (np.asarray(edited, dtype=np.float32) - orig) * alpha[..., None]
        expected = np.clip(np.rint(whole), 0, 255).astype(np.uint8)
        expected[alpha <= 0] = orig[alpha <= 0]
        assert np.array_equal(np.asarray(paste_back(original, edited, alpha)), expected)
    nothing = np.zeros((64, 96), dtype=np.float32)
    assert paste_back(original, edited, nothing).tobytes() == original.tobytes()
