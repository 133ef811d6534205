"""Fixtures for engine tests: tiny diffusers pipelines, built once per session, loaded offline."""

from __future__ import annotations

import os
from pathlib import Path

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
