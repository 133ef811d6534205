"""`openedits tasks …` and `openedits webhooks …`: the admin endpoints' views, on the store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from openedits.api.app import create_app
from openedits.cli import app
from openedits.runtime import Runtime
from openedits.schemas import TaskState
from openedits.settings import Settings
from openedits.store.tasks import NewTask
from openedits.webhooks import DeliveryState, Outbox, Outcome
from tests.fakes import FakeEngine

runner = CliRunner()
ADMIN = {"authorization": "Bearer admin-token"}


@dataclass
class Seeded:
    """A store with one task in each interesting state, and their callbacks."""

    rt: Runtime
    pending: str
    running: str
    succeeded: str
    failed: str
    delivered_hook: str  # the succeeded task's callback, delivered
    failed_hook: str  # the failed task's callback, given up on a 410


def _id(i: int) -> str:
    return f"{i:08d}-1111-2222-3333-444444444444"


@pytest.fixture
def seeded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Seeded]:
    monkeypatch.setenv("OPENEDITS_DATA_DIR", str(tmp_path))
    rt = Runtime.build(Settings(data_dir=tmp_path), engine=FakeEngine())
    for i, owner in enumerate(["tok_alice", "tok_bob", "tok_alice", "tok_bob"]):
        rt.store.create(NewTask(id=_id(i), owner=owner, trace_id=f"trace-{i}",
                                request={"prompt": f"prompt number {i}"}, priority=1,
                                base_url="http://h/", callback_url=f"https://example.com/h{i}"),
                        {"image_url": "data:..."})
    for i in (1, 2, 3):
        assert rt.store.claim(_id(i), "worker-1", 30)
    assert rt.store.finish(_id(2), TaskState.succeeded,
                           {"success": True, "task_id": _id(2), "image_url": "http://h/g.png"},
                           worker_id="worker-1")
    assert rt.store.finish(
        _id(3), TaskState.failed,
        {"success": False, "task_id": _id(3),
         "error": {"code": "engine_failed", "message": "the engine broke"}},
        error_status=500, worker_id="worker-1")
    outbox = Outbox(rt.db)
    [delivered] = outbox.for_task(_id(2))
    [failed] = outbox.for_task(_id(3))
    for delivery, outcome, status in ((delivered, Outcome.delivered, 204),
                                      (failed, Outcome.gone, 410)):
        claim = outbox.claim(delivery.id, "node-7", seen_attempts=0, lease_seconds=30)
        assert claim is not None
        outbox.record(claim, outcome=outcome, status=status,
                      error="HTTP 410 Gone: no more" if status == 410 else None,
                      duration_ms=4.25)
    try:
        yield Seeded(rt, _id(0), _id(1), _id(2), _id(3), delivered.id, failed.id)
    finally:
        rt.close()


def _run(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _json(*args: str) -> Any:
    return json.loads(_run(*args, "--json"))


def _line(output: str, needle: str) -> str:
    """The one table row that mentions `needle`."""
    [line] = [line for line in output.splitlines() if needle in line]
    return line


def _field(output: str, name: str) -> str:
    """The value of one `name  value` line of a `show`."""
    [line] = [line for line in output.splitlines() if line.startswith(name + "  ")]
    return line[len(name):].strip()


@pytest.fixture
def api(seeded: Seeded) -> TestClient:
    """The admin endpoints over the same database, to compare the command's JSON with."""
    settings = Settings(data_dir=seeded.rt.settings.data_dir, api_tokens="admin-token")
    return TestClient(create_app(settings, engine=FakeEngine()))  # no lifespan: no loop runs


def test_tasks_list_is_a_table_newest_first(seeded: Seeded) -> None:
    out = _run("tasks", "list")
    ids = [seeded.failed, seeded.succeeded, seeded.running, seeded.pending]
    positions = [out.index(i) for i in ids]
    assert positions == sorted(positions)  # newest first, each on its own row
    assert "succeeded" in _line(out, seeded.succeeded)
    failed_row = _line(out, seeded.failed)
    assert "failed" in failed_row and "tok_bob" in failed_row
    assert "engine_failed: the engine broke" in failed_row
    assert "prompt number 1" in _line(out, seeded.running)
    assert "1-4 of 4 tasks, newest first" in out


def test_tasks_list_filters_and_pages(seeded: Seeded) -> None:
    out = _run("tasks", "list", "--state", "running")
    assert seeded.running in out and seeded.pending not in out and "of 1 tasks" in out
    out = _run("tasks", "list", "--owner", "tok_alice", "--limit", "1")
    assert seeded.succeeded in out and seeded.pending not in out
    assert "1-1 of 2 tasks" in out
    assert "no tasks (of 2)" in _run("tasks", "list", "--owner", "tok_alice", "--offset", "5")
    bad = runner.invoke(app, ["tasks", "list", "--state", "done"])
    assert bad.exit_code == 2 and "done" in bad.output


def test_tasks_list_json_is_the_admin_retrieve_batch(seeded: Seeded, api: TestClient) -> None:
    got = _json("tasks", "list")
    wire = api.post("/midjourney/tasks", headers=ADMIN,
                    json={"action": "retrieve_batch", "limit": 20}).json()
    assert got["count"] == wire["count"] == 4
    for ours, theirs in zip(got["items"], wire["items"], strict=True):
        assert {k: v for k, v in ours.items() if k in theirs} == theirs
    assert [i["owner"] for i in got["items"]] == ["tok_bob", "tok_alice", "tok_bob", "tok_alice"]
    assert _json("tasks", "list", "--state", "failed")["items"][0]["error"]["code"] == (
        "engine_failed")


def test_tasks_show(seeded: Seeded) -> None:
    out = _run("tasks", "show", seeded.failed)
    assert _field(out, "trace id") == "trace-3"
    assert _field(out, "error") == "engine_failed: the engine broke"
    assert _field(out, "callback url") == "https://example.com/h3"
    assert seeded.failed_hook in out and "410" in _line(out, seeded.failed_hook)
    shown = _json("tasks", "show", seeded.failed)
    assert shown["id"] == seeded.failed and shown["state"] == "failed"
    assert [d["id"] for d in shown["deliveries"]] == [seeded.failed_hook]
    assert shown["deliveries"][0]["attempts"][0]["outcome"] == "gone"
    missing = runner.invoke(app, ["tasks", "show", "nope"])
    assert missing.exit_code == 1 and "no task 'nope'" in missing.output


def test_tasks_cancel_a_pending_task_ends_it_and_owes_its_callback(seeded: Seeded) -> None:
    out = _run("tasks", "cancel", seeded.pending)
    assert f"cancelled {seeded.pending}" in out
    row = seeded.rt.store.get(seeded.pending)
    assert row is not None and row.state is TaskState.cancelled
    assert row.response is not None and row.response["error"]["code"] == "cancelled"
    [owed] = Outbox(seeded.rt.db).for_task(seeded.pending)
    assert owed.state is DeliveryState.pending and '"cancelled"' in owed.body


def test_tasks_cancel_a_running_task_asks_it_to_stop(seeded: Seeded) -> None:
    record = _json("tasks", "cancel", seeded.running)
    assert record["state"] == "running"
    assert seeded.rt.store.cancel_requested(seeded.running)
    out = _run("tasks", "show", seeded.running)
    assert "stops at its next step" in _field(out, "cancel")


def test_tasks_cancel_an_ended_task_changes_nothing(seeded: Seeded) -> None:
    out = _run("tasks", "cancel", seeded.succeeded)
    assert "already ended (succeeded); nothing changed" in out
    row = seeded.rt.store.get(seeded.succeeded)
    assert row is not None and row.state is TaskState.succeeded
    assert runner.invoke(app, ["tasks", "cancel", "nope"]).exit_code == 1


def test_webhooks_list_shows_failed_ones_by_default(seeded: Seeded) -> None:
    out = _run("webhooks", "list")
    row = _line(out, seeded.failed_hook)
    assert seeded.failed in row and "failed" in row and "410" in row
    assert "https://example.com/h3" in row and "HTTP 410 Gone: no more" in row
    assert seeded.delivered_hook not in out
    assert "1-1 of 1 failed deliveries" in out
    every = _run("webhooks", "list", "--state", "all")
    assert seeded.delivered_hook in every and seeded.failed_hook in every
    mine = _run("webhooks", "list", "--state", "all", "--task-id", seeded.succeeded)
    assert seeded.delivered_hook in mine and seeded.failed_hook not in mine


def test_webhooks_json_is_what_the_admin_endpoints_answer(seeded: Seeded,
                                                          api: TestClient) -> None:
    for state in ("failed", "delivered", "pending", "all"):
        wire = api.get("/admin/webhooks/deliveries", params={"state": state},
                       headers=ADMIN).json()
        assert _json("webhooks", "list", "--state", state) == wire
    wire_one = api.get(f"/admin/webhooks/deliveries/{seeded.failed_hook}", headers=ADMIN).json()
    assert _json("webhooks", "show", seeded.failed_hook) == wire_one


def test_webhooks_show_lists_every_attempt(seeded: Seeded) -> None:
    out = _run("webhooks", "show", seeded.failed_hook)
    assert _field(out, "task") == seeded.failed
    assert _field(out, "url") == "https://example.com/h3"
    assert _field(out, "last status") == "410"
    attempt = _line(out, "node-7")
    assert attempt.split()[0] == "1" and "4.2 ms" in attempt and "gone" in attempt
    missing = runner.invoke(app, ["webhooks", "show", "msg_nope"])
    assert missing.exit_code == 1 and "no webhook delivery 'msg_nope'" in missing.output


def test_webhooks_resend_requeues_with_the_same_id(seeded: Seeded) -> None:
    out = _run("webhooks", "resend", seeded.failed_hook)
    assert f"queued {seeded.failed_hook} again" in out and "attempt 2 comes next" in out
    delivery = Outbox(seeded.rt.db).get(seeded.failed_hook)
    assert delivery is not None and delivery.state is DeliveryState.pending
    assert delivery.failures == 0 and delivery.attempts == 1
    shown = _json("webhooks", "resend", seeded.delivered_hook)
    assert shown["id"] == seeded.delivered_hook and shown["state"] == "pending"
    missing = runner.invoke(app, ["webhooks", "resend", "msg_nope"])
    assert missing.exit_code == 1 and "msg_nope" in missing.output


def test_a_bad_configuration_is_one_line(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENEDITS_ENGINE", "upstream")
    result = runner.invoke(app, ["webhooks", "list"])
    assert result.exit_code == 2 and "OPENEDITS_UPSTREAM_URL" in result.output
