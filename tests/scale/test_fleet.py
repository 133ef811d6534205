"""A fleet of real processes (2 API nodes, 2 Celery workers, Redis, PostgreSQL, SeaweedFS)
loses nothing: a worker killed mid-task and Redis restarting empty still leave every accepted
task succeeded once, downloadable from either node, called back once, streamed across nodes,
and cancellable from any node."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import AUTH, data_uri, fresh_postgres
from tests.fakes import serve_receiver
from tests.scale._fleet import (
    WorkerProcess,
    fleet_env,
    flush_redis,
    needs_services,
    restart_redis_empty,
)
from tests.servers import ServerProcess, free_port

pytestmark = [pytest.mark.services, pytest.mark.slow, needs_services]

STEP = 0.5  # the FakeEngine's 4 steps: 2 s a task, long enough for a stream to see it run


def _api(env: dict[str, str]) -> ServerProcess:
    port = free_port()
    import sys

    return ServerProcess(env, port, [sys.executable, "-m", "tests._serve", str(port), str(STEP)])


def _record(url: str, task_id: str) -> dict[str, Any]:
    r = httpx.post(url + "/midjourney/tasks", headers=AUTH, json={"id": task_id}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _running_owner(db_url: str) -> list[tuple[str, int]]:
    """(task id, pid of the worker process holding it) of every running task."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT id, lease_owner FROM tasks WHERE state = 'running'")).all()
    finally:
        engine.dispose()
    return [(task_id, int(owner.split(":")[1])) for task_id, owner in rows if owner]


def test_fleet_survives_a_dead_worker_and_an_empty_redis(tmp_path: Path, image) -> None:
    flush_redis()
    with fresh_postgres() as db_url, serve_receiver() as receiver:
        env = fleet_env(tmp_path / "data", db_url)
        nodes = [_api(env), _api(env)]
        workers = [WorkerProcess(env, STEP, "cpu,cpu"), WorkerProcess(env, STEP, "cpu")]
        try:
            for node in nodes:
                node.wait_healthy()
            _run_fleet(nodes, workers, env, db_url, receiver, image)
        finally:
            for w in workers:
                w.stop()
            for node in nodes:
                node.stop()


def _run_fleet(nodes: list[ServerProcess], workers: list[WorkerProcess], env: dict[str, str],
               db_url: str, receiver: Any, image: Any) -> None:
    a, b = nodes[0].url, nodes[1].url
    uri = data_uri(image)
    accepted: dict[str, str] = {}  # task id -> kind
    lock = threading.Lock()
    sync_replies: list[httpx.Response] = []
    streams: list[list[dict[str, Any]]] = []

    def submit(node: str, kind: str, i: int, prompt: str = "") -> None:
        body: dict[str, Any] = {"image_url": uri, "prompt": prompt or f"fleet {kind} {i}",
                                "mode": ("turbo", "fast", "relax")[i % 3]}
        if kind == "async":
            body["async"] = True
        elif kind == "callback":
            body["callback_url"] = f"{receiver.url}/hook/{i}"
        if kind == "stream":
            with httpx.stream("POST", node + "/midjourney/edits", json=body, timeout=120,
                              headers={**AUTH, "accept": "application/x-ndjson"}) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("application/x-ndjson")
                lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
            with lock:
                streams.append(lines)
                accepted[lines[-1]["task_id"]] = kind
            return
        r = httpx.post(node + "/midjourney/edits", headers=AUTH, json=body, timeout=120)
        with lock:
            if kind == "sync":
                sync_replies.append(r)
            assert r.status_code == 200, r.text
            accepted[r.json()["task_id"]] = kind

    def burst(kinds: list[str], offset: int) -> list[threading.Thread]:
        threads = []
        for i, kind in enumerate(kinds):
            node = (a, b)[(i + offset) % 2]
            if kind in {"sync", "stream"}:
                t = threading.Thread(target=submit, args=(node, kind, i + offset))
                t.start()
                threads.append(t)
            else:
                submit(node, kind, i + offset)
        return threads

    # 24 tasks in before anything breaks: a queue of about 10 s for three pool processes.
    threads = burst(["async"] * 8 + ["callback"] * 6 + ["sync"] * 6 + ["stream"] * 4, 0)

    # kill -9 the second worker (its pool process too) while it runs a task.
    victim, deadline = None, time.monotonic() + 30
    while victim is None and time.monotonic() < deadline:
        victim = next((t for t, pid in _running_owner(db_url) if workers[1].owns(pid)), None)
        time.sleep(0.05)
    assert victim is not None, workers[1].output()[-3000:]
    workers[1].kill9()
    workers[1].stop()
    workers[1] = WorkerProcess(env, STEP, "cpu")

    # Redis loses everything it held: the queued messages, the unacked ones, the marker.
    restart_redis_empty()
    threads += burst(["async"] * 4 + ["callback"] * 4, 1)
    for t in threads:
        t.join(150)
    assert len(accepted) == 32

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        records = {i: _record((a, b)[n % 2], i) for n, i in enumerate(accepted)}
        if all(r["state"] in {"succeeded", "failed", "cancelled"} for r in records.values()):
            break
        time.sleep(0.5)
    states = Counter(r["state"] for r in records.values())
    assert states == {"succeeded": 32}, (states, workers[0].output()[-3000:])

    # The killed worker's task ran again elsewhere.
    engine = create_engine(db_url)
    with engine.connect() as conn:
        attempts = conn.execute(text("SELECT attempts FROM tasks WHERE id = :i"),
                                {"i": victim}).scalar_one()
        owed = Counter(conn.execute(text("SELECT task_id FROM webhook_deliveries")).scalars())
    engine.dispose()
    assert attempts >= 2

    assert all(r.status_code == 200 and r.json()["success"] for r in sync_replies)
    # Streams that ran through the chaos ended with the result, progress never going back (a
    # progress message lost while Redis restarted only delays a stream: the store is the
    # fallback).
    for lines in streams:
        progress = [line["progress"] for line in lines]
        assert lines[-1]["success"] is True and progress[-1] == 100
        assert len(progress) >= 2 and progress == sorted(progress), progress
    # Every callback task owed one callback, and it arrived once, with one webhook-id.
    callback_ids = {i for i, kind in accepted.items() if kind == "callback"}
    assert set(owed) == callback_ids and set(owed.values()) == {1}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(receiver.received) < len(callback_ids):
        time.sleep(0.2)
    time.sleep(1.0)  # a duplicate would arrive about now
    finals = [r for r in receiver.received if r.json().get("progress") == 100]
    assert Counter(r.json()["task_id"] for r in finals) == dict.fromkeys(callback_ids, 1)
    assert len({r.headers["webhook-id"] for r in finals}) == len(callback_ids)

    # Results come from the bucket through either node.
    for record in records.values():
        path = "/files/" + record["response"]["image_url"].split("/files/", 1)[1]
        first, second = (httpx.get(base + path, timeout=10) for base in (a, b))
        assert first.status_code == second.status_code == 200
        assert first.content == second.content and first.content[:4] == b"\x89PNG"

    # A cancel sent to node B stops a task that a worker runs for node A.
    task_id = httpx.post(a + "/midjourney/edits", headers=AUTH, timeout=10,
                         json={"image_url": uri, "prompt": "cancel me", "async": True}
                         ).json()["task_id"]
    deadline = time.monotonic() + 30
    while _record(b, task_id)["state"] != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    cancelled = httpx.post(b + "/midjourney/tasks", headers=AUTH, timeout=10,
                           json={"action": "cancel", "id": task_id})
    assert cancelled.status_code == 200
    deadline = time.monotonic() + 30
    while _record(a, task_id)["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    final = _record(a, task_id)
    assert final["state"] == "cancelled", final

    # Last, a stream on either node follows a 10 s task ("[slow]") and sees a worker's progress
    # from the other process, through Redis restarted empty.
    for node in (a, b):
        streams.clear()
        began = time.monotonic()
        submit(node, "stream", 100, prompt="fleet stream [slow]")
        progress = [line["progress"] for line in streams[0]]
        assert streams[0][-1]["success"] is True and progress[-1] == 100
        assert any(0 < p < 100 for p in progress), (progress, f"{time.monotonic() - began:.1f} s")
