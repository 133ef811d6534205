"""Fixtures for the client tests (helpers live in client_support.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.client.client_support import TOKEN, FakeServer, LiveServer, mask_bytes, png_bytes, serve


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes())
    return path


@pytest.fixture
def mask_file(tmp_path: Path) -> Path:
    path = tmp_path / "mask.png"
    path.write_bytes(mask_bytes())
    return path


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The real app, engine opencv, served by uvicorn on a free loopback port for this module."""
    with serve(tmp_path_factory.mktemp("openedits-data")) as live:
        yield live


@pytest.fixture
def make_app(tmp_path: Path) -> Callable[[], Any]:
    """Build the real app (not started) with test settings."""

    def build() -> Any:
        from openedits.api.app import create_app
        from openedits.settings import Settings

        return create_app(
            Settings(
                data_dir=tmp_path / "data",
                api_tokens=TOKEN,
                allow_private_urls=True,
                engine="opencv",
                rate_limit="10000/minute",
            )
        )

    return build
