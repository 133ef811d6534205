"""Shared fixtures: clean environment, explicit Settings, an app on a fake or real engine."""

from __future__ import annotations

import base64
import io
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from openedits.api.app import create_app
from openedits.engines.base import Engine
from openedits.settings import Settings
from tests.engines.contract import make_test_image, make_test_mask
from tests.fakes import FakeEngine

TOKEN = "test-token"
TESTCLIENT_HOST = "testserver"
# Read-only: one test that let a library add its own headers to this shared mapping once made
# every later request of the session send two `accept` fields (schemathesis' case.call does).
AUTH: Mapping[str, str] = MappingProxyType({"authorization": f"Bearer {TOKEN}"})

# The real services scripts/test started (scripts/services.py), read once at import: the autouse
# fixture below clears every OPENEDITS_* variable before each test.
SERVICES = {k: v for k, v in os.environ.items() if k.startswith("OPENEDITS_TEST_")}
POSTGRES_URL = SERVICES.get("OPENEDITS_TEST_POSTGRES_URL")


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


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, and (when scripts/test started PostgreSQL) a
    database of its own on the test server, so store tests run on both."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db.sqlite'}"
        return
    if not POSTGRES_URL:
        pytest.skip("PostgreSQL is not running (scripts/test starts it)")
    with fresh_postgres() as url:
        yield url


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """The URL of a new, empty database on the test PostgreSQL server, dropped afterwards."""
    assert POSTGRES_URL, "PostgreSQL is not running (scripts/test starts it)"
    name = "t_" + secrets.token_hex(6)
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
