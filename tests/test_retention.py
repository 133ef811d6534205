"""Tasks and their files are forgotten once they ended longer ago than the retention."""

from __future__ import annotations

from pathlib import Path

from openedits.retention import RESULT_FILES, purge_expired
from openedits.runtime import Runtime
from openedits.schemas import TaskState
from openedits.settings import Settings
from openedits.store.tasks import NewTask
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
