"""Hostile HTTP around the edits: Host headers, HEAD, caching of results, the page's headers,
credentials in errors. Each case is one the hostile tester found (issue 9) and its whole class."""

from __future__ import annotations

import io
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from openedits.api.app import create_app
from openedits.api.routes.files import cache_control
from openedits.api.routes.web import WEB_DIR
from openedits.settings import Settings
from tests.conftest import AUTH, data_uri, png_bytes
from tests.fakes import FakeEngine
from tests.servers import serve_in_thread

DAY = 86_400


def _app_client(settings: Settings, **update: object) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=update), engine=FakeEngine()),
                      raise_server_exceptions=False)


def _count(tc: TestClient) -> int:
    return int(tc.post("/midjourney/tasks", headers=AUTH,
                       json={"action": "retrieve_batch", "limit": 1}).json()["count"])


# --- Host decides result URLs: only trusted ones are answered


@pytest.mark.parametrize("host", ["attacker.example:8443", "attacker.example", "evil.test",
                                  "127.0.0.1.attacker.example", "localhost.attacker.example",
                                  "[::2]:80"])
def test_an_untrusted_host_is_refused_before_any_task(settings: Settings, image,
                                                      host: str) -> None:
    with _app_client(settings) as tc:
        before = _count(tc)
        r = tc.post("/midjourney/edits", headers={**AUTH, "host": host},
                    json={"image_url": data_uri(image), "prompt": "x",
                          "callback_url": "http://127.0.0.1:9/hook"})
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["error"]["code"] == "bad_request"
        message = body["error"]["message"]
        assert message.startswith("Host:") and host in message
        assert "localhost" in message and "OPENEDITS_ALLOWED_HOSTS" in message
        assert body["trace_id"] == r.headers["x-trace-id"]
        assert _count(tc) == before


def test_a_real_server_builds_urls_only_from_trusted_hosts(tmp_path: Path, image,
                                                           monkeypatch) -> None:
    monkeypatch.delenv("OPENEDITS_ALLOWED_HOSTS")
    settings = Settings(data_dir=tmp_path, api_tokens="test-token", allow_private_urls=True)
    with serve_in_thread(create_app(settings, engine=FakeEngine())) as url:
        body = {"image_url": data_uri(image), "prompt": "x"}
        r = httpx.post(url + "/midjourney/edits", headers={**AUTH, "host": "attacker.example:8443"},
                       json=body, timeout=30)
        assert r.status_code == 400 and "attacker.example:8443" in r.json()["error"]["message"]
        r = httpx.post(url + "/midjourney/edits", headers=AUTH, json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["image_url"].startswith(url + "/files/")
        # Probes form no URL and are answered whatever the Host (orchestrators send an IP).
        assert httpx.get(url + "/healthz", headers={"host": "10.1.2.3:8000"}).status_code == 200


def test_configured_hosts_are_trusted(settings: Settings, image) -> None:
    body = {"image_url": data_uri(image), "prompt": "x"}
    with _app_client(settings, public_url="https://edits.example.com",
                     allowed_hosts="*.corp.example, api.example") as tc:
        for host in ("edits.example.com", "a.corp.example", "API.example:8080", "localhost:1",
                     "[::1]:8000"):
            r = tc.post("/midjourney/edits", headers={**AUTH, "host": host}, json=body)
            assert r.status_code == 200, (host, r.text)
            assert r.json()["image_url"].startswith("https://edits.example.com/files/")
        r = tc.post("/midjourney/edits", headers={**AUTH, "host": "corp.example.evil"}, json=body)
        assert r.status_code == 400
    with _app_client(settings, allowed_hosts="*") as tc:
        r = tc.post("/midjourney/edits", headers={**AUTH, "host": "anything.test"}, json=body)
        assert r.status_code == 200


# --- HEAD is GET without the body


@pytest.fixture
def task_files(settings: Settings, image) -> Iterator[tuple[TestClient, str]]:
    with _app_client(settings) as tc:
        r = tc.post("/midjourney/edits", headers=AUTH,
                    json={"image_url": data_uri(image), "prompt": "x", "split_images": True})
        assert r.status_code == 200, r.text
        yield tc, r.json()["task_id"]


def test_head_answers_like_get_without_a_body(task_files: tuple[TestClient, str]) -> None:
    tc, task_id = task_files
    for path in ("/", "/healthz", f"/files/{task_id}/grid.png", f"/files/{task_id}/0_0.png",
                 "/web/app.js"):
        got, head = tc.get(path), tc.head(path)
        assert head.status_code == got.status_code == 200, (path, head.status_code)
        assert head.content == b""
        assert head.headers["content-type"] == got.headers["content-type"]
        if path != "/healthz":  # its queue depth may change between the two calls
            assert head.headers["content-length"] == got.headers["content-length"], path
    missing = tc.head(f"/files/{uuid.uuid4()}/grid.png")
    assert missing.status_code == 404
    r = tc.request("DELETE", "/healthz")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"


# --- results are cached no longer than they are kept; lists of them use small renditions


def test_results_are_cached_no_longer_than_retention(settings: Settings, image) -> None:
    with _app_client(settings, retention_days=0.5) as tc:
        task_id = tc.post("/midjourney/edits", headers=AUTH,
                          json={"image_url": data_uri(image), "prompt": "x"}).json()["task_id"]
        r = tc.get(f"/files/{task_id}/grid.png")
        control = r.headers["cache-control"]
        max_age = int(re.search(r"max-age=(\d+)", control).group(1))  # type: ignore[union-attr]
        assert 0 < max_age <= 0.5 * DAY, control
        assert "31536000" not in control
    now = time.time()
    assert cache_control(30 * DAY, now - 29 * DAY, now).startswith("public, max-age=86400")
    assert cache_control(30 * DAY, now - 31 * DAY, now) == "no-store"
    assert cache_control(30 * DAY, None, now) == "public, max-age=86400, immutable"


def test_a_large_grid_has_a_small_rendition(settings: Settings) -> None:
    with _app_client(settings) as tc:
        task_id = str(uuid.uuid4())
        grid = Image.radial_gradient("L").resize((2048, 2048)).convert("RGB")
        noise = Image.effect_noise((2048, 2048), 40)
        full = png_bytes(Image.merge("RGB", [grid.getchannel(0), noise, grid.getchannel(2)]))
        tc.app.state.runtime.blobs.put(f"{task_id}/grid.png", full, "image/png")
        for width in (128, 1024):
            r = tc.get(f"/files/{task_id}/grid.png?w={width}")
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "image/webp"
            with Image.open(io.BytesIO(r.content)) as small:
                assert small.size == (width, width)
        thumb = tc.get(f"/files/{task_id}/grid.png?w=128")
        assert len(thumb.content) * 100 < len(full), (len(thumb.content), len(full))
        assert "max-age" in thumb.headers["cache-control"]
        for bad in ("100", "0", "-1", "abc", "99999999999999999999", ""):
            r = tc.get(f"/files/{task_id}/grid.png?w={bad}")
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["message"].startswith("w: got")
        assert tc.get(f"/files/{uuid.uuid4()}/grid.png?w=128").status_code == 404


# --- the page keeps a token: no inline script, no framing, no sniffing


def test_the_page_is_served_with_a_strict_policy(client: TestClient) -> None:
    r = client.get("/")
    csp = r.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == "'self'"
    assert directives["default-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in csp
    for path in ("/", "/healthz", "/web/app.js"):
        headers = client.get(path).headers
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
    # The policy would block these, so the page must not rely on them.
    html = (WEB_DIR / "index.html").read_text()
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html))
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html)


# --- credentials are never echoed


@pytest.mark.parametrize("header", ["Basic dXNlcjpodW50ZXIy", "oe_Zq9xK3vW7pL2mN8r",
                                    "Token s3cr3t-vaLue9", "Digest username=qzadmin, rsp=x7q",
                                    "bearer", "Bearer "])
def test_a_wrong_authorization_header_is_not_echoed(client: TestClient, header: str) -> None:
    r = client.post("/midjourney/edits", headers={"authorization": header},
                    json={"image_url": "x", "prompt": "x"})
    assert r.status_code == 401, r.text
    message = r.json()["error"]["message"]
    assert "Bearer <token>" in message
    secret = header.partition(" ")[2].strip() or header.strip()
    if secret.lower() != "bearer":
        for start in range(0, max(1, len(secret) - 4)):
            assert secret[start:start + 5] not in message, (secret, message)
