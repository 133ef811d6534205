"""The staged in-process dispatcher: inputs prepared off the device, fair between tokens, drain,
and per-task timings."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from openedits.api.app import create_app
from openedits.runtime import Runtime
from openedits.schemas import TaskState
from openedits.settings import Settings
from openedits.store.tasks import NewTask
from openedits.workers.dispatch import InProcessDispatcher
from openedits.workers.events import TaskEvent, TaskFinished
from tests.conftest import data_uri
from tests.fakes import FakeEngine

A = {"authorization": "Bearer token-a"}
B = {"authorization": "Bearer token-b"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", api_tokens="token-a,token-b",
                    allow_private_urls=True, lease_seconds=5, reaper_interval_seconds=0.5,
                    sync_timeout_seconds=30, fetch_timeout_seconds=5, rate_limit="off")


@contextmanager
def hanging_origin() -> Iterator[str]:
    """A loopback server that accepts connections and never answers; closing it at the end
    makes every waiting fetch fail at once."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/photo.png"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def _record(tc: TestClient, headers: dict[str, str], task_id: str) -> dict[str, Any]:
    return dict(tc.post("/midjourney/tasks", headers=headers, json={"id": task_id}).json())


def test_a_slow_origin_never_holds_another_tokens_edit(settings: Settings, image) -> None:
    with hanging_origin() as url, TestClient(create_app(settings, engine=FakeEngine())) as tc:
        slow = [tc.post("/midjourney/edits", headers=A, json={
            "image_url": url, "prompt": f"slow {i}", "async": True}).json()["task_id"]
            for i in range(5)]
        r = tc.post("/midjourney/edits", headers=B, json={
            "image_url": data_uri(image), "prompt": "small sync edit"})
        assert r.status_code == 200, r.text
        assert r.json()["success"] is True
        # B's edit ended while every one of A's tasks still waits on its origin.
        states = [_record(tc, A, t)["state"] for t in slow]
        assert all(s in ("pending", "running") for s in states), states


def test_one_tokens_burst_cannot_starve_another_tokens_task(settings: Settings, image) -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    body = {"image_url": data_uri(image), "prompt": "burst", "async": True}
    with TestClient(create_app(settings, engine=engine)) as tc:
        burst = [tc.post("/midjourney/edits", headers=A, json=body).json()["task_id"]
                 for _ in range(20)]
        assert engine.started.wait(5)
        other = tc.post("/midjourney/edits", headers=B, json=body).json()["task_id"]
        engine.gate.set()
        deadline = time.time() + 30
        while time.time() < deadline:
            records = {t: _record(tc, A, t) for t in burst}
            mine = _record(tc, B, other)
            if all(r["state"] == "succeeded" for r in [*records.values(), mine]):
                break
            time.sleep(0.1)
    assert mine["state"] == "succeeded"
    before = [t for t, r in records.items() if r["started_at"] < mine["started_at"]]
    # A's task on the device and the two its input slots held: B's came next.
    assert len(before) <= 4, f"{len(before)} of A's 20 tasks started before B's"


def _task(rt: Runtime, i: int, owner: str = "o") -> str:
    task_id = f"{i:08d}-0000-0000-0000-000000000000"
    body = {"image_url": data_uri(Image.new("RGB", (16, 16), (1, 2, 3))), "prompt": "p"}
    rt.store.create(NewTask(id=task_id, owner=owner, trace_id=f"t{i}", request={},
                            priority=1, base_url="http://h/"), body)
    return task_id


def test_drain_finishes_what_fits_and_hands_back_the_rest(settings: Settings) -> None:
    engine = FakeEngine(steps=50, step_seconds=0.05)  # 2.5 s an edit
    rt = Runtime.build(settings, engine=engine)
    try:
        ids = [_task(rt, i) for i in range(3)]
        dispatcher = InProcessDispatcher(rt)
        dispatcher.start()
        dispatcher.submit(ids[0], 1)
        assert engine.started.wait(5)
        deadline = time.time() + 5
        while time.time() < deadline and rt.store.get(ids[1]).lease_owner is None:
            time.sleep(0.02)  # the next task is prepared behind the running one
        t0 = time.monotonic()
        dispatcher.drain(0.3)
        assert time.monotonic() - t0 < 3, "drain waits no longer than its grace (and a join)"
        rows = [rt.store.get(t) for t in ids]
        # The running task did not fit in the grace: back to pending, as were the others;
        # no attempt counted, no lease left, never started.
        assert [r.state for r in rows] == [TaskState.pending] * 3
        assert [r.attempts for r in rows] == [0, 0, 0]
        assert all(r.lease_owner is None and r.started_at is None for r in rows)
        assert len(engine.calls) == 1
    finally:
        rt.close()


def test_a_slot_the_device_frees_is_refilled_at_once(settings: Settings) -> None:
    # More tasks than input threads, and no periodic look within the test (a 30 s reaper
    # interval): every task after the first few is reserved only because the device, having
    # started the one it took, wakes an input thread to refill the freed slot.
    settings = settings.model_copy(update={"input_threads": 2, "reaper_interval_seconds": 30})
    rt = Runtime.build(settings, engine=FakeEngine(steps=2, step_seconds=0.01))
    try:
        ids = [_task(rt, i) for i in range(8)]
        dispatcher = InProcessDispatcher(rt)
        dispatcher.start()
        dispatcher.submit(ids[0], 1)
        deadline = time.monotonic() + 10
        while rt.store.live(ids) and time.monotonic() < deadline:
            time.sleep(0.02)
        dispatcher.stop()
        assert [rt.store.get(t).state for t in ids] == [TaskState.succeeded] * 8
    finally:
        rt.close()


def test_drain_lets_a_running_task_finish_within_its_grace(settings: Settings) -> None:
    engine = FakeEngine(steps=4, step_seconds=0.1)
    engine.gate = threading.Event()
    rt = Runtime.build(settings, engine=engine)
    try:
        ids = [_task(rt, 1), _task(rt, 2)]
        dispatcher = InProcessDispatcher(rt)
        dispatcher.start()
        dispatcher.submit(ids[0], 1)
        assert engine.started.wait(5)
        # Both are prepared side by side by two input threads; the device runs whichever was
        # ready first, so the test asks the store which one that is.
        running = [t for t in ids if rt.store.get(t).state is TaskState.running]
        assert len(running) == 1
        (waiting,) = set(ids) - set(running)
        threading.Timer(0.2, engine.gate.set).start()
        dispatcher.drain(10)
        assert rt.store.get(running[0]).state is TaskState.succeeded
        assert rt.store.get(waiting).state is TaskState.pending
        assert rt.store.get(waiting).attempts == 0
    finally:
        rt.close()


def test_an_ended_task_keeps_its_timings_and_says_them(settings: Settings, image) -> None:
    seen: list[TaskEvent] = []
    app = create_app(settings, engine=FakeEngine(steps=2, step_seconds=0.05))
    app.state.runtime.bus.subscribe(seen.append)
    with TestClient(app) as tc:
        r = tc.post("/midjourney/edits", headers=A, json={
            "image_url": data_uri(image), "prompt": "x"})
        assert r.status_code == 200, r.text
        task_id = r.json()["task_id"]
        row = app.state.runtime.store.get(task_id)
    timings = row.timings
    assert set(timings) == {"queue", "inputs", "engine", "results", "total"}
    assert all(v >= 0 for v in timings.values())
    assert timings["engine"] >= 0.1  # two steps of 0.05 s
    parts = timings["queue"] + timings["inputs"] + timings["engine"] + timings["results"]
    assert parts == pytest.approx(timings["total"], abs=0.01)
    [finished] = [e for e in seen if isinstance(e, TaskFinished)]
    assert finished.timings == timings


def test_a_cancelled_task_leaves_the_queue_at_once(settings: Settings, image) -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    body = {"image_url": data_uri(image), "prompt": "x", "async": True}
    with TestClient(create_app(settings, engine=engine)) as tc:
        first = tc.post("/midjourney/edits", headers=A, json=body).json()["task_id"]
        assert engine.started.wait(5)
        queued = tc.post("/midjourney/edits", headers=A, json=body).json()["task_id"]
        rt = tc.app.state.runtime  # type: ignore[attr-defined]
        deadline = time.time() + 5
        while time.time() < deadline and rt.store.get(queued).lease_owner is None:
            time.sleep(0.02)
        assert rt.store.get(queued).lease_owner is not None  # held, prepared, not started
        record = tc.post("/midjourney/tasks", headers=A,
                         json={"action": "cancel", "id": queued}).json()
        assert record["state"] == "cancelled" and record["started_at"] is None
        disp = tc.app.state.dispatcher  # type: ignore[attr-defined]
        deadline = time.time() + 2
        while time.time() < deadline and disp._inputs.held():
            time.sleep(0.02)
        assert disp._inputs.held() == []
        engine.gate.set()
        deadline = time.time() + 5
        while time.time() < deadline and _record(tc, A, first)["state"] != "succeeded":
            time.sleep(0.02)
    assert len(engine.calls) == 1


class _NotingEngine(FakeEngine):
    """Says it did something differently, as the diffusers engine does on an OOM retry."""

    def edit(self, *args: Any, **kwargs: Any) -> list[Image.Image]:
        from openedits.engines.base import add_note

        add_note("retried once with memory saving on")
        return super().edit(*args, **kwargs)


def test_an_engines_notes_are_kept_with_the_task(settings: Settings, image) -> None:
    app = create_app(settings, engine=_NotingEngine())
    with TestClient(app) as tc:
        r = tc.post("/midjourney/edits", headers=A, json={
            "image_url": data_uri(image), "prompt": "x"})
        assert r.status_code == 200, r.text
        row = app.state.runtime.store.get(r.json()["task_id"])
    assert row.notes == ["retried once with memory saving on"]
