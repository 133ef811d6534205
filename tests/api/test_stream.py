"""accept: application/x-ndjson on /midjourney/edits: rising progress, then the final body."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from openedits.api.app import create_app
from openedits.runtime import Runtime
from openedits.settings import Settings
from tests.api.test_edits import RESULT_KEYS
from tests.conftest import AUTH, TOKEN, data_uri
from tests.fakes import BrokenEngine, FakeEngine, serve_receiver

STREAM = {**AUTH, "accept": "application/x-ndjson"}


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", api_tokens=TOKEN, allow_private_urls=True,
                    lease_seconds=5, reaper_interval_seconds=0.5, sync_timeout_seconds=30,
                    webhook_retry_delays="0.1s,0.2s", **extra)


def _lines(client: TestClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", "/midjourney/edits", headers=STREAM, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


def test_stream_rises_and_ends_with_the_result(tmp_path: Path, image) -> None:
    engine = FakeEngine(steps=5, step_seconds=0.03)
    with TestClient(create_app(_settings(tmp_path), engine=engine)) as tc:
        lines = _lines(tc, {"image_url": data_uri(image), "prompt": "x", "split_images": True})
    *progress, final = lines
    assert len(progress) >= 3, lines
    values = [p["progress"] for p in progress]
    assert values == sorted(set(values)), "one line per change, rising"
    assert values[0] <= 5 and values[-1] < 100
    task_id = final["task_id"]
    assert all(set(p) == {"task_id", "progress"} and p["task_id"] == task_id for p in progress)
    assert set(final) == RESULT_KEYS
    assert final["success"] is True and final["progress"] == 100
    assert len(final["sub_image_urls"]) == 4


def test_a_second_accept_field_asking_for_the_stream_is_heard(tmp_path: Path, image) -> None:
    # Repeated header fields are one list in HTTP; a client (or a proxy) that adds its own
    # `accept: */*` ahead of the caller's must not turn a stream into a sync reply.
    with TestClient(create_app(_settings(tmp_path), engine=FakeEngine(steps=3))) as tc:
        r = tc.post("/midjourney/edits", json={"image_url": data_uri(image), "prompt": "x"},
                    headers=[*AUTH.items(), ("accept", "*/*"),
                             ("accept", "application/x-ndjson")])
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines() if line]
    assert lines[0]["progress"] < 100 and lines[-1]["success"] is True


def test_stream_of_a_failing_task_ends_with_the_error_body(tmp_path: Path, image) -> None:
    with TestClient(create_app(_settings(tmp_path), engine=BrokenEngine())) as tc:
        lines = _lines(tc, {"image_url": data_uri(image), "prompt": "x"})
    final = lines[-1]
    assert final["success"] is False and final["error"]["code"] == "api_error"
    assert set(final) == {"success", "task_id", "error", "trace_id"}
    assert all("success" not in line for line in lines[:-1])


def test_stream_refusal_is_an_ordinary_error_reply(tmp_path: Path) -> None:
    with TestClient(create_app(_settings(tmp_path), engine=FakeEngine())) as tc:
        r = tc.post("/midjourney/edits", headers=STREAM, json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"


def test_stream_with_callback_posts_progress_then_the_final_body(tmp_path: Path, image) -> None:
    # Slow enough (≈1.2 s) that the 0.5 s throttle lets a few progress POSTs through.
    engine = FakeEngine(steps=8, step_seconds=0.15)
    with serve_receiver() as receiver, \
            TestClient(create_app(_settings(tmp_path), engine=engine)) as tc:
        lines = _lines(tc, {"image_url": data_uri(image), "prompt": "x",
                            "callback_url": receiver.url + "/hook"})
        task_id = lines[-1]["task_id"]
        with receiver.arrived:  # the final body comes from the outbox, maybe after the stream
            receiver.arrived.wait_for(
                lambda: any(r.json()["progress"] == 100 for r in receiver.received), 10)
        rt: Runtime = tc.app.state.runtime  # type: ignore[attr-defined]
        secret = rt.webhook_secret()
    got = list(receiver.received)
    bodies = [Webhook(secret).verify(r.body, r.headers) for r in got]
    progress = [b for b in bodies if b["progress"] < 100]
    finals = [b for b in bodies if b["progress"] == 100]
    assert len(finals) == 1 and finals[0] == lines[-1]
    assert 1 <= len(progress) <= len(lines) - 1
    assert all(b["task_id"] == task_id and "success" not in b for b in progress)
    # Progress POSTs are throttled and each has its own id; only the final is from the outbox.
    ids = [r.headers["webhook-id"] for r in got]
    assert len(set(ids)) == len(ids)
