"""Tasks, their files and their callbacks are forgotten once they ended longer ago than the
retention."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from openedits.retention import PURGE_EVERY, RESULT_FILES, purge_expired, purge_when_due
from openedits.runtime import Runtime
from openedits.schemas import TaskState
from openedits.settings import Settings
from openedits.store._tables import webhook_attempts
from openedits.store.tasks import NewTask
from openedits.webhooks import Outbox, Outcome, owe_callback
from tests.fakes import FakeClock, FakeEngine

DAY = 86400.0


def _task(rt: Runtime, i: int, *, end: TaskState | None) -> str:
    task_id = f"{i:08d}-0000-0000-0000-000000000000"
    rt.store.create(NewTask(id=task_id, owner="o", trace_id=f"t{i}", request={}, priority=1,
                            base_url="http://h/"), {"image_url": "data:..."})
    for name in RESULT_FILES:
        rt.blobs.put(f"{task_id}/{name}", b"png", "image/png")
    if end is not None:
        assert rt.store.claim(task_id, "w", 30)
        assert rt.store.finish(task_id, end, {"success": end is TaskState.succeeded},
                               worker_id="w")
    return task_id


def test_only_tasks_ended_before_the_retention_go(tmp_path: Path) -> None:
    clock = FakeClock(1_000_000_000.0)
    rt = Runtime.build(Settings(data_dir=tmp_path, retention_days=2), engine=FakeEngine(),
                       clock=clock)
    try:
        old_ok = _task(rt, 1, end=TaskState.succeeded)
        old_failed = _task(rt, 2, end=TaskState.failed)
        still_pending = _task(rt, 3, end=None)
        clock.now += 1.5 * DAY
        recent = _task(rt, 4, end=TaskState.succeeded)
        clock.now += 1 * DAY  # the first two ended 2.5 days ago, the last one 1 day ago

        assert purge_expired(rt, batch=1) == 2
        for gone in (old_ok, old_failed):
            assert rt.store.get(gone) is None
            assert all(rt.blobs.local_path(f"{gone}/{n}") is None for n in RESULT_FILES)
        for kept in (still_pending, recent):
            assert rt.store.get(kept) is not None
            assert all(rt.blobs.local_path(f"{kept}/{n}") for n in RESULT_FILES)
        assert purge_expired(rt) == 0
    finally:
        rt.close()


def _attempt(outbox: Outbox, delivery_id: str, outcome: Outcome, status: int,
             next_at: float | None = None) -> None:
    delivery = outbox.get(delivery_id)
    assert delivery is not None
    claim = outbox.claim(delivery_id, "node", seen_attempts=delivery.attempts, lease_seconds=30)
    assert claim is not None
    assert outbox.record(claim, outcome=outcome, status=status, error=None, duration_ms=1.0,
                         next_attempt_at=next_at)


def _attempt_rows(rt: Runtime, delivery_id: str) -> int:
    query = select(func.count()).select_from(webhook_attempts).where(
        webhook_attempts.c.delivery_id == delivery_id)
    with rt.db.connect() as conn:
        return int(conn.execute(query).scalar_one())


def test_callback_deliveries_go_a_retention_after_they_end(tmp_path: Path) -> None:
    # Issue 12.7: delivered webhook rows and their attempts are pruned too, and failed ones a
    # retention after their last attempt; owed ones stay whatever their age.
    clock = FakeClock(1_000_000_000.0)
    rt = Runtime.build(Settings(data_dir=tmp_path, retention_days=2), engine=FakeEngine(),
                       clock=clock)
    outbox = Outbox(rt.db, clock=clock)

    def owe(task_id: str) -> str:
        with rt.db.begin() as conn:
            return owe_callback(conn, task_id=task_id, url="http://h/hook", body={}, now=clock())

    try:
        old_delivered, old_gone, still_owed, failed_late, resent = (
            owe(f"t-{i}") for i in range(5))
        _attempt(outbox, old_delivered, Outcome.delivered, 200)
        _attempt(outbox, old_gone, Outcome.gone, 410)
        _attempt(outbox, still_owed, Outcome.retry, 500, next_at=clock() + 10 * DAY)
        _attempt(outbox, failed_late, Outcome.retry, 500, next_at=clock() + DAY)
        _attempt(outbox, resent, Outcome.failed, 500)
        clock.now += 1.5 * DAY
        _attempt(outbox, failed_late, Outcome.failed, 500)  # given up 1 day before the purge
        recent = owe("t-recent")
        _attempt(outbox, recent, Outcome.delivered, 200)
        clock.now += 0.9 * DAY
        assert outbox.resend(resent) is not None  # an operator re-sends it: owed again
        clock.now += 0.1 * DAY  # the first attempts were 2.5 days ago, the later ones 1 day

        purge_expired(rt, batch=1)
        for gone in (old_delivered, old_gone):
            assert outbox.get(gone) is None
            assert _attempt_rows(rt, gone) == 0
        for kept in (still_owed, failed_late, resent, recent):
            assert outbox.get(kept) is not None
            assert _attempt_rows(rt, kept) >= 1
        assert {d.id for d in outbox.page(limit=100)[0]} == {still_owed, failed_late, resent,
                                                             recent}
        clock.now += 1.1 * DAY
        purge_expired(rt)
        assert {d.id for d in outbox.page(limit=100)[0]} == {still_owed, resent}
    finally:
        rt.close()


def test_a_pass_runs_only_when_due_and_a_failure_waits_for_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(1_000_000_000.0)
    rt = Runtime.build(Settings(data_dir=tmp_path, retention_days=1), engine=FakeEngine(),
                       clock=clock)
    try:
        old = _task(rt, 1, end=TaskState.succeeded)
        clock.now += 2 * DAY
        later = time.monotonic() + 60
        assert purge_when_due(rt, later) == later
        assert rt.store.get(old) is not None, "not due yet: nothing purged"

        due = purge_when_due(rt, 0.0)
        assert rt.store.get(old) is None
        assert time.monotonic() + PURGE_EVERY - 5 < due <= time.monotonic() + PURGE_EVERY

        rt.db.dispose()
        (tmp_path / "openedits.db").unlink()
        (tmp_path / "openedits.db").mkdir()  # the store cannot be opened: the pass fails
        assert purge_when_due(rt, 0.0) > time.monotonic()
        assert "purging expired tasks failed" in caplog.text
    finally:
        rt.close()
