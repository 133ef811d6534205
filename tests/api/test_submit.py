"""Submit-time checks through the HTTP app: every source field alike, content-encodings, the
bounded task record, and the task id on every sync error."""

from __future__ import annotations

import gzip
import json
import sqlite3
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from openedits.api.app import create_app
from openedits.settings import Settings
from tests.conftest import AUTH, TESTCLIENT_HOST, TOKEN, data_uri
from tests.engines.contract import make_test_image, make_test_mask
from tests.fakes import FakeEngine

IMAGE_URI = data_uri(make_test_image((96, 64)))
MASK_URI = data_uri(make_test_mask((96, 64)))
MAX_BODY = 3_000_000
LONG_URL = "https://example.com/" + "a" * 9000


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("submit"), api_tokens=TOKEN,
                        allow_private_urls=True, rate_limit="off", max_body_bytes=MAX_BODY,
                        lease_seconds=5, reaper_interval_seconds=0.5, sync_timeout_seconds=15,
                        allowed_hosts=TESTCLIENT_HOST)
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in __import__("os").environ if k.startswith("OPENEDITS_")]:
            mp.delenv(key)
        with TestClient(create_app(settings, engine=FakeEngine()),
                        raise_server_exceptions=False) as tc:
            yield tc


def _count(tc: TestClient) -> int:
    r = tc.post("/midjourney/tasks", headers=AUTH, json={"action": "retrieve_batch", "limit": 1})
    return int(r.json()["count"])


def _refused(tc: TestClient, body: dict[str, Any], field: str, code: str = "bad_request",
             **kwargs: Any) -> dict[str, Any]:
    before = _count(tc)
    r = tc.post("/midjourney/edits", headers=AUTH, json=body, **kwargs)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["code"] == code and field in error["message"], error
    assert _count(tc) == before, "a refused submit must leave no task behind"
    return dict(error)


def _wait(tc: TestClient, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        record = tc.post("/midjourney/tasks", headers=AUTH, json={"id": task_id}).json()
        if record["state"] in ("succeeded", "failed", "cancelled"):
            return dict(record)
        assert time.monotonic() < deadline, record
        time.sleep(0.05)


# --- every source field is checked alike, at submit


@pytest.mark.parametrize("mode", [{}, {"async": True}], ids=["sync", "async"])
@pytest.mark.parametrize(("field", "value"), [
    ("image_url", ""), ("mask", ""), ("callback_url", ""),
    ("image_url", "   "), ("mask", "   "), ("callback_url", "   "),
    ("image_url", "ftp://example.com/a.png"), ("mask", "ftp://example.com/a.png"),
    ("callback_url", "ftp://example.com/hook"),
    ("image_url", "http:///a.png"), ("mask", "http:///a.png"), ("callback_url", "http:///hook"),
    ("image_url", LONG_URL), ("mask", LONG_URL), ("callback_url", LONG_URL),
    ("image_url", "data:image/png;base64,!!!!"), ("mask", "data:image/png;base64,!!!!"),
    ("mask", "not base64 at all!"), ("image_url", "data:image/png;base64,"),
    ("mask", "data:image/png;base64,"), ("image_url", "data:image/png,AAAA"),
])
def test_source_and_url_fields_are_refused_alike_before_any_task_exists(
    api: TestClient, field: str, value: str, mode: dict[str, Any]
) -> None:
    body = {"image_url": IMAGE_URI, "prompt": "a red hat", **mode, field: value}
    _refused(api, body, field)


@pytest.mark.parametrize("field", ["image_url", "mask"])
def test_an_inline_input_over_the_image_limit_is_413_at_submit(field: str,
                                                               tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_tokens=TOKEN, max_image_bytes=1000)
    big = data_uri(make_test_image((800, 600)), "JPEG")
    assert len(big) > 2000 > 1000 > len(IMAGE_URI)
    with TestClient(create_app(settings, engine=FakeEngine())) as tc:
        _refused(tc, {"image_url": IMAGE_URI, "prompt": "x", field: big}, field,
                 "payload_too_large")


def test_schemes_are_case_insensitive_in_every_field(api: TestClient) -> None:
    upper = "DATA:" + IMAGE_URI[5:]
    r = api.post("/midjourney/edits", headers=AUTH, json={
        "image_url": upper, "mask": "Data:" + MASK_URI[5:], "prompt": "x",
        "callback_url": "HTTPS://127.0.0.1:9/hook", "async": True})
    assert r.status_code == 200, r.text
    assert _wait(api, r.json()["task_id"])["state"] == "succeeded"
    r = api.post("/midjourney/edits", headers=AUTH, json={
        "image_url": "HTTP://127.0.0.1:9/a.png", "prompt": "x", "async": True})
    assert r.status_code == 200, r.text
    record = _wait(api, r.json()["task_id"])
    # Accepted at submit; the fetch then fails on the closed port, naming the field.
    assert record["state"] == "failed" and "image_url" in record["error"]["message"]


def test_lenient_base64_is_accepted_and_edited(api: TestClient) -> None:
    payload = IMAGE_URI.split(",", 1)[1]
    wrapped = "\n".join(payload[i:i + 76] for i in range(0, len(payload), 76))
    urlsafe = payload.replace("+", "-").replace("/", "_").rstrip("=")
    for image in ("data:image/png;base64," + wrapped, "data:image/png;base64," + urlsafe):
        r = api.post("/midjourney/edits", headers=AUTH,
                     json={"image_url": image, "mask": urlsafe, "prompt": "x"})
        assert r.status_code == 200, r.text


# --- content-encoding


def _post_raw(tc: TestClient, raw: bytes, encoding: str) -> Any:
    return tc.post("/midjourney/edits", content=raw, headers={
        **AUTH, "content-type": "application/json", "content-encoding": encoding})


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate", "deflate-raw"])
def test_compressed_bodies_are_decoded(api: TestClient, encoding: str) -> None:
    raw = json.dumps({"image_url": IMAGE_URI, "prompt": "x", "async": True}).encode()
    if encoding == "deflate-raw":  # what some clients send as "deflate"
        packer = zlib.compressobj(wbits=-15)
        packed, encoding = packer.compress(raw) + packer.flush(), "deflate"
    else:
        packed = gzip.compress(raw) if "gzip" in encoding else zlib.compress(raw)
    r = _post_raw(api, packed, encoding)
    assert r.status_code == 200, r.text
    assert _wait(api, r.json()["task_id"])["state"] == "succeeded"


def test_a_compressed_body_that_expands_past_the_limit_is_413(api: TestClient) -> None:
    bomb = gzip.compress(b'{"prompt": "' + b"a" * (MAX_BODY * 4) + b'"}')
    assert len(bomb) < MAX_BODY // 50
    r = _post_raw(api, bomb, "gzip")
    assert r.status_code == 413 and "decompresses" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(("raw", "encoding", "status", "needle"), [
    (b"not gzip at all", "gzip", 400, "gzip"),
    (gzip.compress(b'{"prompt": "x"}')[:-12], "gzip", 400, "truncated"),
    (b"{}", "br", 415, "'br'"),
    (b"{}", "zstd", 415, "'zstd'"),
])
def test_bad_or_unknown_encodings_name_the_encoding(
    api: TestClient, raw: bytes, encoding: str, status: int, needle: str
) -> None:
    r = _post_raw(api, raw, encoding)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and needle in body["error"]["message"], body
    if status == 415:
        assert body["error"]["code"] == "unsupported_media_type"
        assert "gzip" in body["error"]["message"]


# --- the task record keeps a bounded copy of the request


def test_unknown_keys_are_kept_bounded_and_known_fields_whole(api: TestClient) -> None:
    big = "x" * 1_000_000
    body = {"image_url": IMAGE_URI, "prompt": "a red hat", "async": True, "mode": "relax",
            "note": "short and kept", "huge": big, "nested": {"deep": [big, 1, 2]},
            "list": list(range(1000)), "y" * 1000: "long key"}
    r = api.post("/midjourney/edits", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    record = _wait(api, r.json()["task_id"])
    request = record["request"]
    assert len(json.dumps(request)) < 6000
    assert request["prompt"] == "a red hat" and request["mode"] == "relax"
    assert request["async"] is True and "sha256:" in request["image_url"]
    assert request["note"] == "short and kept"
    assert request["huge"].startswith("x" * 200) and "sha256:" in request["huge"]
    assert "1,000,000 chars" in request["huge"]
    assert request["nested"]["deep"][1:] == [1, 2]
    assert request["list"][:16] == list(range(16)) and "984 more items" in request["list"][-1]
    batch = api.post("/midjourney/tasks", headers=AUTH,
                     json={"action": "retrieve_batch", "ids": [record["id"]]})
    assert len(batch.content) < 10_000


def test_ten_thousand_unknown_keys_keep_a_few_kb(api: TestClient) -> None:
    wide = {f"k{i}": "v" * 50 for i in range(10_000)}
    r = api.post("/midjourney/edits", headers=AUTH,
                 json={**wide, "image_url": IMAGE_URI, "prompt": "x", "async": True})
    assert r.status_code == 200, r.text
    request = _wait(api, r.json()["task_id"])["request"]
    assert len(json.dumps(request)) < 6000
    assert request["k0"] == "v" * 50 and request["prompt"] == "x"
    assert "more unknown keys not kept" in request["…"]


# --- sync errors all carry the task id


def test_a_sync_timeout_answers_504_with_the_task_id(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_tokens=TOKEN, sync_timeout_seconds=0.5)
    with TestClient(create_app(settings, engine=FakeEngine(step_seconds=1.0))) as tc:
        r = tc.post("/midjourney/edits", headers=AUTH,
                    json={"image_url": IMAGE_URI, "prompt": "x"})
        assert r.status_code == 504, r.text
        body = r.json()
        assert body["success"] is False and body["error"]["code"] == "timeout"
        assert body["trace_id"] == r.headers["x-trace-id"]
        assert body["task_id"] in body["error"]["message"]
        record = tc.post("/midjourney/tasks", headers=AUTH, json={"id": body["task_id"]}).json()
        assert record["id"] == body["task_id"]


def test_a_locked_database_is_a_503_with_retry_after_not_a_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(Settings(data_dir=tmp_path, api_tokens=TOKEN), engine=FakeEngine())
    store = app.state.runtime.store

    def locked(batch: list[Any]) -> None:
        raise OperationalError("INSERT INTO tasks", {}, sqlite3.OperationalError(
            "database is locked"))

    monkeypatch.setattr(store._inserts, "_transaction", locked)
    with TestClient(app) as tc:
        r = tc.post("/midjourney/edits", headers=AUTH,
                    json={"image_url": IMAGE_URI, "prompt": "x", "async": True})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "server_busy" and int(r.headers["retry-after"]) >= 1
