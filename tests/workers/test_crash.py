"""A server killed with SIGKILL mid-work loses nothing: after a restart every task ends."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import AUTH, TOKEN, data_uri
from tests.servers import fake_engine_server, free_port

pytestmark = pytest.mark.slow


def _record(url: str, task_id: str) -> dict:
    return httpx.post(url + "/midjourney/tasks", headers=AUTH, json={"id": task_id},
                      timeout=5).json()


def test_kill_9_mid_work_then_restart_finishes_every_task(tmp_path, image) -> None:
    env = {
        "OPENEDITS_DATA_DIR": str(tmp_path / "data"),
        "OPENEDITS_API_TOKENS": TOKEN,
        "OPENEDITS_ALLOW_PRIVATE_URLS": "true",
        "OPENEDITS_LEASE_SECONDS": "2",
        "OPENEDITS_REAPER_INTERVAL_SECONDS": "0.5",
    }
    port = free_port()
    body = {"image_url": data_uri(image), "prompt": "x", "async": True}
    with fake_engine_server(env, step_seconds=0.5, port=port) as first:
        ids = [httpx.post(first.url + "/midjourney/edits", headers=AUTH, json=body,
                          timeout=10).json()["task_id"] for _ in range(4)]
        deadline = time.time() + 10
        while time.time() < deadline:
            states = [_record(first.url, i)["state"] for i in ids]
            if "running" in states:
                break
            time.sleep(0.05)
        assert "running" in states and "pending" in states
        first.kill9()

    with fake_engine_server(env, step_seconds=0.05, port=port) as second:
        deadline = time.time() + 30
        while time.time() < deadline:
            records = [_record(second.url, i) for i in ids]
            if all(r["state"] == "succeeded" for r in records):
                break
            time.sleep(0.1)
    assert [r["state"] for r in records] == ["succeeded"] * 4
    assert all(r["response"]["image_url"] for r in records)
