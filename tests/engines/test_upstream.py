"""The upstream engine, forwarding to a real openedits on loopback, passes the contract."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from openedits.api.app import create_app
from openedits.engines.upstream import UpstreamEngine
from openedits.errors import EngineUnavailable, InvalidInput
from openedits.settings import Settings
from tests.conftest import AUTH, TOKEN, data_uri
from tests.engines.contract import EngineContract, make_test_image, make_test_mask
from tests.fakes import FakeEngine
from tests.servers import free_port, serve_in_thread


@pytest.fixture(scope="module")
def upstream_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Another openedits (FakeEngine, 4 steps) served on loopback."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("upstream"), api_tokens=TOKEN,
                        rate_limit="off")
    app = create_app(settings, engine=FakeEngine(steps=4, step_seconds=0.05))
    with serve_in_thread(app) as url:
        yield url


class TestUpstreamEngine(EngineContract):
    @pytest.fixture(autouse=True)
    def _upstream(self, upstream_url: str) -> None:
        self.url = upstream_url

    def make_engine(self) -> UpstreamEngine:
        return UpstreamEngine(self.url, TOKEN, poll_interval=0.05)


def test_wrong_token_is_engine_unavailable(upstream_url: str) -> None:
    engine = UpstreamEngine(upstream_url, "wrong", poll_interval=0.05)
    with pytest.raises(EngineUnavailable, match="refused the token"):
        engine.edit(make_test_image(), make_test_mask(), "x", n=4, seed=0, preset="fast")


def test_unreachable_upstream_is_engine_unavailable() -> None:
    engine = UpstreamEngine(f"http://127.0.0.1:{free_port()}", TOKEN, poll_interval=0.05)
    with pytest.raises(EngineUnavailable, match="unreachable"):
        engine.edit(make_test_image(), make_test_mask(), "x", n=4, seed=0, preset="fast")


def test_upstream_refusal_is_invalid_input(tmp_path: Path) -> None:
    # An upstream that needs a mask refuses a maskless edit; that is the client's 400.
    settings = Settings(data_dir=tmp_path, api_tokens=TOKEN, rate_limit="off")
    app = create_app(settings, engine=FakeEngine(needs_mask=True))
    with serve_in_thread(app) as url:
        engine = UpstreamEngine(url, TOKEN, poll_interval=0.01)
        with pytest.raises(InvalidInput, match="mask"):
            engine.edit(make_test_image(), None, "x", n=4, seed=0, preset="fast")


def test_gateway_end_to_end(upstream_url: str, tmp_path: Path) -> None:
    # openedits in front of openedits: results are copied into the gateway's own storage.
    settings = Settings(data_dir=tmp_path, api_tokens=TOKEN, engine="upstream",
                        upstream_url=upstream_url, upstream_token=TOKEN, rate_limit="off")
    with TestClient(create_app(settings)) as gateway:
        assert gateway.get("/healthz").json()["engine"]["name"] == "upstream"
        r = gateway.post("/midjourney/edits", headers=AUTH, json={
            "image_url": data_uri(make_test_image()), "prompt": "x", "split_images": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["image_url"].startswith("http://testserver/files/")
        for url in body["sub_image_urls"]:
            assert gateway.get(url.removeprefix("http://testserver")).status_code == 200
