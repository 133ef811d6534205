"""Every error a client can cause, from every layer, gets the contract's envelope and status."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from openedits.api.app import create_app
from openedits.settings import Settings
from openedits.store.tokens import TokenStore
from tests.conftest import AUTH, data_uri
from tests.fakes import FakeEngine


def _check_envelope(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"success", "error", "trace_id"}
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["trace_id"] == r.headers["x-trace-id"]
    return body


@pytest.mark.parametrize("headers", [
    {},
    {"authorization": "Bearer nope"},
    {"authorization": "Basic dGVzdDp0ZXN0"},
    {"authorization": "Bearer"},
    {"authorization": "test-token"},
])
def test_bad_tokens_are_401(client: TestClient, headers: dict) -> None:
    r = client.post("/midjourney/edits", headers=headers, json={"image_url": "x", "prompt": "y"})
    _check_envelope(r, 401, "invalid_token")


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": "x"}, "image_url"),
    ({"image_url": "https://example.com/a.png"}, "prompt"),
    ({"image_url": 5, "prompt": "x"}, "image_url"),
    ({"image_url": "https://example.com/a.png", "prompt": ["x"]}, "prompt"),
    ({"image_url": "https://example.com/a.png", "prompt": "x", "mode": "ultra"}, "mode"),
    ({"image_url": "https://example.com/a.png", "prompt": "x", "split_images": "yes"},
     "split_images"),
    ({"image_url": "https://example.com/a.png", "prompt": "x", "async": 1}, "async"),
    ({"image_url": "https://example.com/a.png", "prompt": ""}, "prompt"),
    ({"image_url": "https://example.com/a.png", "prompt": "   "}, "prompt"),
    ({"image_url": "https://example.com/a.png", "prompt": "x" * 4001}, "prompt"),
    ({"image_url": "ftp://example.com/a.png", "prompt": "x"}, "image_url"),
    ({"image_url": "https://example.com/a.png", "prompt": "x", "callback_url": "file:///etc"},
     "callback_url"),
])
def test_bad_fields_are_400_naming_the_field(client: TestClient, body: dict, field: str) -> None:
    r = client.post("/midjourney/edits", headers=AUTH, json=body)
    message = _check_envelope(r, 400, "bad_request")["error"]["message"]
    assert field in message


def test_message_names_value_and_what_is_allowed(client: TestClient) -> None:
    r = client.post("/midjourney/edits", headers=AUTH,
                    json={"image_url": "https://example.com/a.png", "prompt": "x",
                          "mode": "ultra"})
    message = r.json()["error"]["message"]
    assert "'ultra'" in message and "fast" in message and "turbo" in message


@pytest.mark.parametrize("raw", [b"not json", b"[1,2]", b"", b"\xff\xfe", b'"text"', b"{"])
def test_bodies_that_are_not_objects_are_400(client: TestClient, raw: bytes) -> None:
    r = client.post("/midjourney/edits", headers={**AUTH, "content-type": "application/json"},
                    content=raw)
    _check_envelope(r, 400, "bad_request")


def test_null_values_count_as_absent(client: TestClient, image) -> None:
    r = client.post("/midjourney/edits", headers=AUTH, json={
        "image_url": data_uri(image), "prompt": "x", "callback_url": None, "mask": None,
        "mode": None, "split_images": None})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("action", ["upscale", "variation", "reroll"])
def test_other_actions_are_not_implemented(client: TestClient, action: str) -> None:
    r = client.post("/midjourney/edits", headers=AUTH,
                    json={"image_url": "https://example.com/a.png", "prompt": "x",
                          "action": action})
    assert action in _check_envelope(r, 400, "api_not_implemented")["error"]["message"]


@pytest.mark.parametrize("endpoint", ["imagine", "videos", "describe", "translate", "seed",
                                      "shorten"])
def test_other_hosted_endpoints_are_not_implemented(client: TestClient, endpoint: str) -> None:
    r = client.post(f"/midjourney/{endpoint}", headers=AUTH, json={"prompt": "x"})
    _check_envelope(r, 400, "api_not_implemented")


def test_unknown_task_action_is_not_implemented(client: TestClient) -> None:
    r = client.post("/midjourney/tasks", headers=AUTH, json={"action": "delete", "id": "x"})
    _check_envelope(r, 400, "api_not_implemented")


def test_unknown_path_is_404(client: TestClient) -> None:
    _check_envelope(client.get("/nope"), 404, "not_found")
    _check_envelope(client.post("/v1/images/edits", json={}), 404, "not_found")


def test_wrong_method_has_the_envelope(client: TestClient) -> None:
    r = client.get("/midjourney/edits", headers=AUTH)
    assert r.status_code == 405
    assert r.json()["success"] is False and r.json()["trace_id"] == r.headers["x-trace-id"]


def test_moderation_refuses_listed_words(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, api_tokens="test-token", moderation_words="gore, nsfw")
    with TestClient(create_app(settings, engine=FakeEngine())) as tc:
        r = tc.post("/midjourney/edits", headers=AUTH,
                    json={"image_url": "https://example.com/a.png", "prompt": "lots of GORE"})
        assert "gore" in _check_envelope(r, 403, "forbidden")["error"]["message"]
        ok = tc.post("/midjourney/edits", headers=AUTH,
                     json={"image_url": "https://example.com/a.png", "prompt": "gorelike",
                           "async": True})
        assert ok.status_code == 200


def test_token_outside_its_scopes_is_token_mismatched(client: TestClient) -> None:
    store: TokenStore = client.app.state.runtime.tokens
    secret, _ = store.create("reader", ["tasks"])
    headers = {"authorization": f"Bearer {secret}"}
    r = client.post("/midjourney/edits", headers=headers,
                    json={"image_url": "https://example.com/a.png", "prompt": "x"})
    assert "edits" in _check_envelope(r, 400, "token_mismatched")["error"]["message"]
    assert client.post("/midjourney/tasks", headers=headers, json={"id": "x"}).json() == {}


def test_body_over_limit_is_413(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, api_tokens="test-token", max_body_bytes=1000)
    with TestClient(create_app(settings, engine=FakeEngine())) as tc:
        r = tc.post("/midjourney/edits", headers=AUTH,
                    json={"image_url": "data:image/png;base64," + "A" * 2000, "prompt": "x"})
        _check_envelope(r, 413, "payload_too_large")


class _ExplodingDispatcher:
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def submit(self, task_id: str, priority: int) -> None:
        raise RuntimeError("boom: a bug")


def test_a_crash_is_500_naming_the_trace_id(settings: Settings, image) -> None:
    app = create_app(settings, engine=FakeEngine(), dispatcher=_ExplodingDispatcher())
    with TestClient(app, raise_server_exceptions=False) as tc:
        r = tc.post("/midjourney/edits", headers=AUTH,
                    json={"image_url": data_uri(image), "prompt": "x"})
        body = _check_envelope(r, 500, "api_error")
        assert body["trace_id"] in body["error"]["message"]
        assert "boom" not in body["error"]["message"] and "Traceback" not in r.text


def test_opencv_without_mask_is_400(tmp_path, image) -> None:
    settings = Settings(data_dir=tmp_path, api_tokens="test-token")
    with TestClient(create_app(settings)) as tc:
        r = tc.post("/midjourney/edits", headers=AUTH,
                    json={"image_url": data_uri(image), "prompt": "x"})
        assert "mask" in _check_envelope(r, 400, "bad_request")["error"]["message"]


def test_the_token_is_checked_before_the_body_is_read(client: TestClient) -> None:
    # A tokenless client's body is never parsed: garbage without a token is a 401, not a 400.
    for path in ("/midjourney/edits", "/midjourney/tasks"):
        r = client.post(path, headers={"content-type": "application/json"},
                        content=b"[" * 100_000)
        _check_envelope(r, 401, "invalid_token")
