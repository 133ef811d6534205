"""Shared fixtures: clean environment, explicit Settings, an app on a fake or real engine."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from openedits.api.app import create_app
from openedits.engines.base import Engine
from openedits.settings import Settings
from tests.engines.contract import make_test_image, make_test_mask
from tests.fakes import FakeEngine

TOKEN = "test-token"
TESTCLIENT_HOST = "testserver"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing outside the test decides the configuration."""
    for key in list(os.environ):
        if key.startswith("OPENEDITS_"):
            monkeypatch.delenv(key)
    # Starlette's TestClient sends `Host: testserver`; real servers in tests are on loopback,
    # which is trusted anyway.
    monkeypatch.setenv("OPENEDITS_ALLOWED_HOSTS", TESTCLIENT_HOST)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def image() -> Image.Image:
    return make_test_image((96, 64))


@pytest.fixture
def mask() -> Image.Image:
    return make_test_mask((96, 64))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        api_tokens=TOKEN,
        allow_private_urls=True,
        lease_seconds=5,
        reaper_interval_seconds=0.5,
        sync_timeout_seconds=30,
    )


@pytest.fixture
def engine() -> Engine:
    return FakeEngine()


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    app = create_app(settings, engine=engine)
    with TestClient(app, raise_server_exceptions=False) as tc:
        yield tc
