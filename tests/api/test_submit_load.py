"""Submits under load against real server processes: bounded bodies in flight, the queue bound,
no 500 ever, and every accepted task durable through a kill -9 right after its reply."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import AUTH, TOKEN, data_uri
from tests.engines.contract import make_test_image
from tests.servers import ServerProcess, fake_engine_server, free_port

pytestmark = pytest.mark.slow

IMAGE_URI = data_uri(make_test_image((96, 64)))
MB = 1_000_000


def _env(tmp_path: Any, **extra: str) -> dict[str, str]:
    return {
        "OPENEDITS_DATA_DIR": str(tmp_path / "data"),
        "OPENEDITS_API_TOKENS": TOKEN,
        "OPENEDITS_ALLOW_PRIVATE_URLS": "true",
        "OPENEDITS_RATE_LIMIT": "off",
        "OPENEDITS_LEASE_SECONDS": "2",
        "OPENEDITS_REAPER_INTERVAL_SECONDS": "0.5",
        **extra,
    }


def _big_body(size: int) -> bytes:
    """An async submit of about `size` bytes (the bulk in an unknown key, which is allowed)."""
    return json.dumps({"image_url": IMAGE_URI, "prompt": "x", "async": True,
                       "padding": "p" * size}).encode()


def _at_once(n: int, send: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(send, range(n)))


def _post(server: ServerProcess, content: bytes) -> Callable[[int], httpx.Response]:
    def send(_: int) -> httpx.Response:
        return httpx.post(server.url + "/midjourney/edits", content=content, timeout=60,
                          headers={**AUTH, "content-type": "application/json"})
    return send


def _check_overload_reply(r: httpx.Response) -> None:
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == "server_busy", body
    assert int(r.headers["retry-after"]) >= 1
    assert "OPENEDITS_MAX_BODY_BYTES_IN_FLIGHT" in body["error"]["message"]


def _record(server: ServerProcess, task_id: str) -> dict[str, Any]:
    r = httpx.post(server.url + "/midjourney/tasks", headers=AUTH, json={"id": task_id},
                   timeout=10)
    return dict(r.json())


@pytest.mark.timeout(120)
def test_bodies_past_the_budget_get_503_with_retry_after_then_pass(tmp_path: Any) -> None:
    env = _env(tmp_path, OPENEDITS_MAX_BODY_BYTES_IN_FLIGHT=str(7 * MB),
               OPENEDITS_BODY_WAIT_SECONDS="0.5")
    with fake_engine_server(env, step_seconds=0.0) as server:
        # A client that announces 6 MB and sends almost none of it holds 6 MB of the budget.
        stalled = socket.create_connection(("127.0.0.1", server.port))
        stalled.sendall(
            f"POST /midjourney/edits HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            f"authorization: Bearer {TOKEN}\r\n"
            f"content-type: application/json\r\ncontent-length: {6 * MB}\r\n\r\n{{".encode())
        time.sleep(1.0)
        started = time.monotonic()
        refused = _at_once(12, _post(server, _big_body(3 * MB)))
        assert [r.status_code for r in refused] == [503] * 12
        for r in refused:
            _check_overload_reply(r)
        assert time.monotonic() - started < 30
        # Small requests are not held up meanwhile.
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
        stalled.close()
        time.sleep(0.5)
        # With the room back, the same burst goes through: waits, or 503s, never a 500.
        replies = _at_once(12, _post(server, _big_body(3 * MB)))
        statuses = [r.status_code for r in replies]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 2
        for r in replies:
            if r.status_code == 503:
                _check_overload_reply(r)
            else:
                record = _record(server, r.json()["task_id"])
                assert record["id"] == r.json()["task_id"]
                assert len(json.dumps(record["request"])) < 6000


@pytest.mark.timeout(120)
def test_a_burst_of_large_submits_never_gets_a_500(tmp_path: Any) -> None:
    env = _env(tmp_path, OPENEDITS_MAX_BODY_BYTES_IN_FLIGHT=str(7 * MB),
               OPENEDITS_BODY_WAIT_SECONDS="2")
    with fake_engine_server(env, step_seconds=0.0) as server:
        replies = _at_once(12, _post(server, _big_body(3 * MB)))
        statuses = [r.status_code for r in replies]
        assert set(statuses) <= {200, 503}, statuses
        for r in replies:
            if r.status_code == 503:
                _check_overload_reply(r)
        accepted = [r.json()["task_id"] for r in replies if r.status_code == 200]
        assert accepted
        assert all(_record(server, i)["id"] == i for i in accepted)


@pytest.mark.timeout(120)
def test_the_queue_bound_holds_under_concurrent_submits(tmp_path: Any) -> None:
    env = _env(tmp_path, OPENEDITS_QUEUE_MAX="5")
    body = json.dumps({"image_url": IMAGE_URI, "prompt": "x", "async": True}).encode()
    # Four steps of 5 s: no task ends while the burst is answered.
    with fake_engine_server(env, step_seconds=5.0) as server:
        replies = _at_once(30, _post(server, body))
        statuses = sorted(r.status_code for r in replies)
        assert statuses == [200] * 5 + [429] * 25, statuses
        for r in replies:
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "too_many_requests"
                assert int(r.headers["retry-after"]) >= 1
        # /healthz reads the store through a probe refreshed every 2 s: wait for a fresh one.
        deadline = time.monotonic() + 10
        while True:
            active = httpx.get(server.url + "/healthz", timeout=5).json()["queue"]["active"]
            if active == 5 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert active == 5


@pytest.mark.timeout(180)
def test_kill_9_right_after_the_replies_loses_no_accepted_task(tmp_path: Any) -> None:
    env = _env(tmp_path)
    port = free_port()
    body = json.dumps({"image_url": IMAGE_URI, "prompt": "x", "async": True}).encode()
    with fake_engine_server(env, step_seconds=1.0, port=port) as first:
        replies = _at_once(20, _post(first, body))
        first.kill9()  # at once: the replies are all the client has seen
    assert [r.status_code for r in replies] == [200] * 20
    ids = [r.json()["task_id"] for r in replies]
    with fake_engine_server(env, step_seconds=0.0, port=port) as second:
        deadline = time.monotonic() + 60
        while True:
            records = [_record(second, i) for i in ids]
            if all(r.get("state") == "succeeded" for r in records):
                break
            assert time.monotonic() < deadline, [r.get("state") for r in records]
            time.sleep(0.2)
    assert [r["id"] for r in records] == ids
