"""SIGTERM on a real server process with tasks in flight: drain, answer everyone, lose nothing."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from openedits.api.app import create_app
from openedits.schemas import TaskState
from openedits.settings import Settings
from openedits.store.database import create_db_engine
from openedits.store.tasks import TaskStore
from tests.conftest import AUTH as TEST_AUTH
from tests.conftest import data_uri
from tests.fakes import FakeEngine
from tests.servers import ServerProcess, fake_engine_server

AUTH = {"authorization": "Bearer tok"}


def _env(tmp_path: Path, drain_seconds: float) -> dict[str, str]:
    return {"OPENEDITS_DATA_DIR": str(tmp_path), "OPENEDITS_API_TOKENS": "tok",
            "OPENEDITS_DRAIN_SECONDS": str(drain_seconds), "OPENEDITS_RATE_LIMIT": "off",
            "OPENEDITS_LEASE_SECONDS": "30"}


def _store(tmp_path: Path) -> TaskStore:
    return TaskStore(create_db_engine(f"sqlite:///{(tmp_path / 'openedits.db').resolve()}"))


def _sync_edit(server: ServerProcess, body: dict[str, Any], out: list[httpx.Response]) -> None:
    out.append(httpx.post(server.url + "/midjourney/edits", headers=AUTH, json=body, timeout=60))


def _wait_state(store: TaskStore, state: TaskState, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows, _ = store.page(owner=None, limit=100)
        if sum(r.state is state for r in rows) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} task(s) {state.value}")


@pytest.mark.slow
def test_sigterm_finishes_running_work_answers_waiters_and_keeps_the_queue(
        tmp_path: Path, image) -> None:
    body = {"image_url": data_uri(image), "prompt": "a hat"}
    store = _store(tmp_path)
    with fake_engine_server(_env(tmp_path, 20), step_seconds=0.5) as server:
        running: list[httpx.Response] = []
        queued: list[httpx.Response] = []
        a = threading.Thread(target=_sync_edit, args=(server, body, running))
        a.start()
        _wait_state(store, TaskState.running, 1)
        async_id = httpx.post(server.url + "/midjourney/edits", headers=AUTH, timeout=10,
                              json={**body, "async": True}).json()["task_id"]
        b = threading.Thread(target=_sync_edit, args=(server, body, queued))
        b.start()
        _wait_state(store, TaskState.pending, 2)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # At once: not ready, while the running task still finishes.
        ready = httpx.get(server.url + "/readyz", timeout=5)
        assert ready.status_code == 503, ready.text
        assert ready.json()["error"]["code"] == "unavailable"
        assert "draining" in ready.json()["not_ready"]["process"]
        a.join(30)
        b.join(30)
        assert server.proc.wait(30) == 0, server.output()[-3000:]
        assert time.monotonic() - signalled < 20
    # The running task's caller got its result; the queued one a 503 envelope with its id.
    assert running[0].status_code == 200 and running[0].json()["success"] is True
    reply = queued[0]
    assert reply.status_code == 503, reply.text
    assert reply.headers["retry-after"]
    waiting = reply.json()
    assert waiting["success"] is False and waiting["error"]["code"] == "unavailable"
    assert waiting["task_id"] in waiting["error"]["message"]
    assert waiting["trace_id"] == reply.headers["x-trace-id"]
    # Nothing lost: both queued tasks are still pending, and run after a restart.
    pending = {r.id for r in store.page(owner=None, limit=100)[0]
               if r.state is TaskState.pending}
    assert pending == {async_id, waiting["task_id"]}
    with fake_engine_server(_env(tmp_path, 20), step_seconds=0.0):
        _wait_state(store, TaskState.succeeded, 3)


@pytest.mark.slow
def test_tasks_past_the_grace_go_back_to_pending_at_once(tmp_path: Path, image) -> None:
    body = {"image_url": data_uri(image), "prompt": "a hat"}
    store = _store(tmp_path)
    with fake_engine_server(_env(tmp_path, 1), step_seconds=3) as server:
        replies: list[httpx.Response] = []
        a = threading.Thread(target=_sync_edit, args=(server, body, replies))
        a.start()
        _wait_state(store, TaskState.running, 1)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        a.join(30)
        assert server.proc.wait(30) == 0, server.output()[-3000:]
        # Inside the shutdown timeout serve gives uvicorn (the drain plus 15 s), which a process
        # manager's stop timeout is told to exceed.
        assert time.monotonic() - signalled < 1 + 15
    reply = replies[0]
    assert reply.status_code == 503, reply.text
    task_id = reply.json()["task_id"]
    row = store.get(task_id)
    assert row is not None and row.state is TaskState.pending
    # Released, not left to its lease; and the attempt is not counted against it.
    assert row.lease_owner is None and row.attempts == 0


def test_a_stream_waiting_on_a_queued_task_ends_with_the_503_body(
        settings: Settings, image) -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    app = create_app(settings.model_copy(update={"workers_per_device": 1}), engine=engine)
    body = {"image_url": data_uri(image), "prompt": "a hat"}
    with TestClient(app) as client:
        try:
            client.post("/midjourney/edits", headers=TEST_AUTH, json={**body, "async": True})
            assert engine.started.wait(10)  # the device is busy: the next task waits
            app.state.lifecycle.draining.set()
            with client.stream("POST", "/midjourney/edits", json=body,
                               headers={**TEST_AUTH, "accept": "application/x-ndjson"}) as r:
                lines = [line for line in r.iter_lines() if line]
        finally:
            engine.gate.set()
    last = httpx.Response(200, content=lines[-1]).json()
    assert last["success"] is False and last["error"]["code"] == "unavailable"
    assert last["task_id"] in last["error"]["message"]
