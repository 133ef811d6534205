"""POST /midjourney/tasks {"action": "cancel"}: queued and running tasks end `cancelled`, and a
late success never overwrites that."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from openedits.api.app import create_app
from openedits.engines.base import (
    Preset,
    ProgressCallback,
    ShouldCancel,
    never_cancel,
    no_progress,
)
from openedits.runtime import Runtime
from openedits.schemas import TaskState
from openedits.settings import Settings
from openedits.store.tasks import NewTask
from tests.conftest import AUTH, TOKEN, data_uri
from tests.fakes import FakeEngine, serve_receiver


class StubbornEngine(FakeEngine):
    """Never looks at should_cancel: finishes its edit whatever it is told."""

    def edit(self, image: Image.Image, mask: Image.Image | None, prompt: str, *, n: int,
             seed: int, preset: Preset, on_progress: ProgressCallback = no_progress,
             should_cancel: ShouldCancel = never_cancel) -> list[Image.Image]:
        return super().edit(image, mask, prompt, n=n, seed=seed, preset=preset,
                            on_progress=on_progress)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", api_tokens=TOKEN, allow_private_urls=True,
                    lease_seconds=5, reaper_interval_seconds=0.5, sync_timeout_seconds=30,
                    webhook_retry_delays="0.1s,0.2s")


@pytest.fixture
def gated() -> FakeEngine:
    engine = FakeEngine(steps=20, step_seconds=0.01)
    engine.gate = threading.Event()
    return engine


@pytest.fixture
def client(settings: Settings, gated: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=gated)) as tc:
        yield tc
        gated.gate.set()  # type: ignore[union-attr]


def _submit(client: TestClient, image: Image.Image, **extra: Any) -> str:
    r = client.post("/midjourney/edits", headers=AUTH,
                    json={"image_url": data_uri(image), "prompt": "x", "async": True, **extra})
    assert r.status_code == 200, r.text
    return str(r.json()["task_id"])


def _cancel(client: TestClient, task_id: str) -> dict[str, Any]:
    r = client.post("/midjourney/tasks", headers=AUTH, json={"action": "cancel", "id": task_id})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _record(client: TestClient, task_id: str) -> dict[str, Any]:
    return dict(client.post("/midjourney/tasks", headers=AUTH, json={"id": task_id}).json())


def _until_ended(client: TestClient, task_id: str) -> dict[str, Any]:
    deadline = time.time() + 10
    while time.time() < deadline:
        record = _record(client, task_id)
        if record["state"] not in ("pending", "running"):
            return record
        time.sleep(0.02)
    raise AssertionError(f"task {task_id} did not end")


def _assert_cancelled(record: dict[str, Any]) -> None:
    assert record["state"] == "cancelled"
    assert record["success"] is False
    assert record["error"]["code"] == "cancelled"
    assert record["response"]["success"] is False
    assert record["response"]["error"]["code"] == "cancelled"
    assert record["finished_at"] is not None


def test_cancel_a_queued_task_at_once(client: TestClient, gated: FakeEngine, image) -> None:
    running = _submit(client, image)
    assert gated.started.wait(5)
    queued = _submit(client, image, prompt="queued")
    record = _cancel(client, queued)
    _assert_cancelled(record)  # at once: no engine step needed
    assert record["started_at"] is None
    gated.gate.set()  # type: ignore[union-attr]
    assert _until_ended(client, running)["state"] == "succeeded"
    _assert_cancelled(_record(client, queued))
    assert [c["prompt"] for c in gated.calls] == ["x"], "a cancelled task never runs"


def test_cancel_a_running_task_at_its_next_step(client: TestClient, gated: FakeEngine,
                                                image) -> None:
    task_id = _submit(client, image)
    assert gated.started.wait(5)
    record = _cancel(client, task_id)
    assert record["state"] == "running"  # asked to stop; it stops at the next engine step
    gated.gate.set()  # type: ignore[union-attr]
    _assert_cancelled(_until_ended(client, task_id))


def test_a_late_success_never_overwrites_the_cancel(settings: Settings, image) -> None:
    engine = StubbornEngine(steps=3)
    engine.gate = threading.Event()
    with TestClient(create_app(settings, engine=engine)) as tc:
        task_id = _submit(tc, image)
        assert engine.started.wait(5)
        assert _cancel(tc, task_id)["state"] == "running"
        engine.gate.set()  # the engine ignores the request and produces its variants anyway
        _assert_cancelled(_until_ended(tc, task_id))


def test_the_store_refuses_success_after_cancel(settings: Settings) -> None:
    rt = Runtime.build(settings, engine=FakeEngine())
    try:
        rt.store.create(NewTask(id="t", owner="o", trace_id="tr", request={}, priority=1,
                                base_url="http://x/"), {})
        assert rt.store.claim("t", "w", 30)
        # Without its lease holder's id a running task cannot be ended at all.
        assert not rt.store.finish("t", TaskState.cancelled, {"success": False})
        assert rt.store.finish("t", TaskState.cancelled, {"success": False}, worker_id="w")
        assert not rt.store.finish("t", TaskState.succeeded, {"success": True}, worker_id="w")
        assert not rt.store.finish("t", TaskState.succeeded, {"success": True})
        row = rt.store.get("t")
        assert row is not None and row.state is TaskState.cancelled
        assert row.response == {"success": False}
    finally:
        rt.close()


def test_a_cancelled_task_gets_its_failure_callback(client: TestClient, gated: FakeEngine,
                                                    image) -> None:
    with serve_receiver() as receiver:
        blocker = _submit(client, image)
        assert gated.started.wait(5)
        queued = _submit(client, image, callback_url=receiver.url + "/q")
        _cancel(client, queued)
        [got] = receiver.wait_for(1)
        gated.gate.set()  # type: ignore[union-attr]
        _until_ended(client, blocker)
    assert got.path == "/q"
    body = got.json()
    assert body["task_id"] == queued and body["success"] is False
    assert body["error"]["code"] == "cancelled"


def test_cancel_of_an_ended_or_unknown_task(client: TestClient, gated: FakeEngine,
                                            image) -> None:
    gated.gate.set()  # type: ignore[union-attr]
    task_id = _submit(client, image)
    assert _until_ended(client, task_id)["state"] == "succeeded"
    assert _cancel(client, task_id)["state"] == "succeeded"  # too late: the result stands
    assert _cancel(client, "00000000-0000-0000-0000-000000000000") == {}
    r = client.post("/midjourney/tasks", headers=AUTH, json={"action": "cancel"})
    assert r.status_code == 400 and "id" in r.json()["error"]["message"]
