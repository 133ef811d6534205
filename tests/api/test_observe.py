"""Where the time went, visible to a client (Server-Timing, the record's timings) and to the
operator (one access line per request)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from openedits.api._observe import server_timing
from openedits.api.app import create_app
from openedits.settings import Settings
from openedits.store._tables import tasks
from tests.conftest import AUTH, data_uri
from tests.fakes import FakeEngine

TIMINGS = {"queue": 0.0031, "inputs": 0.012, "engine": 0.8402, "results": 0.0205,
           "total": 0.8758}


def test_server_timing_renders_milliseconds_in_phase_order() -> None:
    assert server_timing({"total": 1.0, "engine": 0.5, "queue": 0.001, "bogus": 3}) == (
        "queue;dur=1.0, engine;dur=500.0, total;dur=1000.0")
    assert server_timing(None) is None
    assert server_timing({"engine": "slow", "inputs": -1, "queue": True}) is None


def _sync_edit_held_at_the_engine(
    client: TestClient, image: object, engine: FakeEngine, while_running: Callable[[], None]
) -> httpx.Response:
    """A sync edit whose task is held at the engine while the row gets TIMINGS (what the runner
    writes at the task's end) and `while_running` runs; then the reply."""
    app = client.app
    reply: dict[str, httpx.Response] = {}
    body = {"image_url": data_uri(image), "prompt": "a hat"}
    sync = threading.Thread(target=lambda: reply.setdefault(
        "r", client.post("/midjourney/edits", headers=AUTH, json=body)))
    engine.gate = threading.Event()
    sync.start()
    try:
        assert engine.started.wait(10)
        with app.state.runtime.db.begin() as conn:  # type: ignore[attr-defined]
            conn.execute(update(tasks).values(timings=TIMINGS))
        while_running()
    finally:
        engine.gate.set()
    sync.join(20)
    return reply["r"]


def test_sync_reply_and_record_carry_the_timings(settings: Settings, image) -> None:
    engine = FakeEngine()
    with TestClient(create_app(settings, engine=engine)) as client:
        r = _sync_edit_held_at_the_engine(client, image, engine, lambda: None)
        assert r.status_code == 200, r.text
        header = r.headers["server-timing"]
        phases = dict(p.split(";dur=") for p in header.split(", "))
        assert list(phases) == ["queue", "inputs", "engine", "results", "total"]
        # The runner may overwrite the test's figures with real ones; each is a duration.
        assert all(float(v) >= 0 for v in phases.values())
        record = client.post("/midjourney/tasks", headers=AUTH,
                             json={"id": r.json()["task_id"]}).json()
        assert set(record["timings"]) >= {"queue", "inputs", "engine", "results", "total"}
        assert float(phases["engine"]) == pytest.approx(record["timings"]["engine"] * 1000,
                                                        abs=0.06)


def test_failed_sync_reply_carries_the_timings_too(settings: Settings, image) -> None:
    engine = FakeEngine(fail_with=None)
    app = create_app(settings, engine=engine)
    with TestClient(app) as client:
        cancelled: list[str] = []

        def cancel() -> None:
            task_id = app.state.runtime.store.page(owner=None)[0][0].id
            client.post("/midjourney/tasks", headers=AUTH, json={"action": "cancel",
                                                                 "id": task_id})
            cancelled.append(task_id)

        r = _sync_edit_held_at_the_engine(client, image, engine, cancel)
        assert r.status_code == 409 and r.json()["task_id"] == cancelled[0]
        assert "engine;dur=" in r.headers["server-timing"]


def test_one_access_line_per_request(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="openedits.access"):
        r = client.get("/healthz")
    lines = [rec for rec in caplog.records if rec.name == "openedits.access"]
    assert len(lines) == 1
    rec = lines[0]
    assert (rec.method, rec.path, rec.status) == ("GET", "/healthz", 200)  # type: ignore[attr-defined]
    assert rec.duration_ms >= 0  # type: ignore[attr-defined]
    assert rec.trace_id == r.headers["x-trace-id"]  # type: ignore[attr-defined]
