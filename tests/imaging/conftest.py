"""Fixtures for the imaging tests: a loopback web server and images built in code."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from tests.test_net import Web


def encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    """The bytes of `image` saved as `fmt`."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def quadrants(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """An RGB image whose four quadrants are red, green, blue and white (easy to locate)."""
    width, height = size
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 255, 0), (width // 2, 0, width, height // 2))
    image.paste((0, 0, 255), (0, height // 2, width // 2, height))
    image.paste((255, 255, 255), (width // 2, height // 2, width, height))
    return image


@pytest.fixture
def web() -> Iterator[Web]:
    server = Web()
    yield server
    server.close()
