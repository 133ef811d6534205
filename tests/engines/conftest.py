"""Fixtures for engine tests: tiny diffusers pipelines, built once per session, loaded offline."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The hub must never be asked for anything: tiny models are built here and loaded from disk.
# Set before huggingface_hub is first imported, since the hub reads the variable at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _build(factory: pytest.TempPathFactory, kind: str) -> Path:
    pytest.importorskip("diffusers")
    from tests.engines.tiny_diffusers import build_tiny_pipeline

    return build_tiny_pipeline(factory.mktemp(f"tiny-{kind}") / "model", kind)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny text-to-image checkpoint (4-channel UNet): inpaints with a mask, img2img without."""
    return _build(tmp_path_factory, "sd")


@pytest.fixture(scope="session")
def tiny_inpaint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny inpainting checkpoint (9-channel UNet)."""
    return _build(tmp_path_factory, "inpaint")


@pytest.fixture(scope="session")
def tiny_pix2pix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny InstructPix2Pix checkpoint (8-channel UNet)."""
    return _build(tmp_path_factory, "pix2pix")


# ---------------------------------------------------------------- transformer edit families

# Qwen-Image-Edit pipelines resize the condition image to about 1024x1024 whatever the output
# size (a tiny model then takes minutes a call on CPU); tests clamp that area to the test size.
QWEN_CONDITION_AREA = 32 * 32
_QWEN_MODULES = (
    "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit",
    "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus",
    "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_inpaint",
)


@pytest.fixture(scope="session")
def _small_qwen_condition() -> Iterator[None]:
    import importlib

    with pytest.MonkeyPatch.context() as patch:
        for name in _QWEN_MODULES:
            module = importlib.import_module(name)
            real = module.calculate_dimensions

            def clamped(area: float, ratio: float, _real: Any = real) -> Any:
                return _real(min(area, QWEN_CONDITION_AREA), ratio)

            patch.setattr(module, "calculate_dimensions", clamped)
        yield


def _build_family(factory: pytest.TempPathFactory, family: str) -> Path:
    pytest.importorskip("diffusers")
    from tests.engines.tiny_families import build_tiny_family

    return build_tiny_family(factory.mktemp(f"tiny-{family}") / "model", family)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_qwen_edit(tmp_path_factory: pytest.TempPathFactory, _small_qwen_condition: None) -> Path:
    """A tiny Qwen-Image-Edit checkpoint (masks through its inpainting sibling)."""
    return _build_family(tmp_path_factory, "qwen-edit")


@pytest.fixture(scope="session")
def tiny_qwen_edit_plus(
    tmp_path_factory: pytest.TempPathFactory, _small_qwen_condition: None
) -> Path:
    """A tiny Qwen-Image-Edit-Plus (2509/2511) checkpoint (no inpainting sibling)."""
    return _build_family(tmp_path_factory, "qwen-edit-plus")


@pytest.fixture(scope="session")
def tiny_flux2_klein(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny distilled FLUX.2 klein checkpoint."""
    return _build_family(tmp_path_factory, "flux2-klein")


@pytest.fixture(scope="session")
def tiny_flux_kontext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1 Kontext checkpoint."""
    return _build_family(tmp_path_factory, "flux-kontext")


@pytest.fixture(scope="session")
def tiny_flux_fill(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1 Fill checkpoint (mask required)."""
    return _build_family(tmp_path_factory, "flux-fill")
