"""InputFiles: a SQLite store's inline inputs in one file per live task, gone when it ends."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from openedits.errors import QueueFull
from openedits.schemas import TaskState
from openedits.store._inputs import InputFiles
from openedits.store._tables import task_payloads
from openedits.store.database import create_db_engine, migrate
from openedits.store.tasks import InlineInput, NewTask, TaskStore
from tests.fakes import FakeClock

ENCODED = base64.b64encode(bytes(range(256)) * 64)
URI = "data:image/png;base64," + ENCODED.decode()
BODY = {"prompt": "x", "image_url": URI, "mask": ENCODED.decode()}
INLINE = {"image_url": InlineInput("data:image/png;base64,", ENCODED),
          "mask": InlineInput("", ENCODED)}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TaskStore]:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    yield TaskStore(engine, clock=FakeClock(1000.0), inputs_dir=tmp_path / "inputs")
    engine.dispose()


def _new(i: int) -> NewTask:
    return NewTask(id=f"{i:08d}-0000-0000-0000-000000000000", owner="o", trace_id=f"t{i}",
                   request={"prompt": "x"}, priority=1, base_url="http://h/")


def _files(store: TaskStore) -> list[str]:
    assert store.input_files is not None
    return sorted(os.listdir(store.input_files.root))


def test_inline_inputs_go_to_one_file_and_come_back_as_sent(store: TaskStore) -> None:
    row = store.create(_new(1), BODY, inline=INLINE)
    assert _files(store) == [row.id]
    with store.engine.connect() as conn:
        data = conn.execute(select(task_payloads.c.data)).scalar_one()
    assert data is None, "the megabytes are in the file, not in the database"
    assert store.payload(row.id) == BODY


def test_the_file_goes_when_the_task_ends(store: TaskStore) -> None:
    row = store.create(_new(1), BODY, inline=INLINE)
    assert store.finish(row.id, TaskState.cancelled, {"success": False})
    assert _files(store) == []
    assert store.payload(row.id) is None


def test_a_refused_insert_leaves_no_file(store: TaskStore) -> None:
    store.create(_new(1), BODY, inline=INLINE, queue_max=1)
    with pytest.raises(QueueFull):
        store.create(_new(2), BODY, inline=INLINE, queue_max=1)
    assert _files(store) == [_new(1).id]


def test_a_lost_file_reads_as_inputs_gone(store: TaskStore) -> None:
    row = store.create(_new(1), BODY, inline=INLINE)
    assert store.input_files is not None
    (store.input_files.root / row.id).unlink()
    assert store.payload(row.id) is None


def test_a_body_without_inline_inputs_writes_no_file(store: TaskStore) -> None:
    row = store.create(_new(1), {"prompt": "x", "image_url": "https://example.com/a.png"})
    assert _files(store) == []
    assert store.payload(row.id) == {"prompt": "x", "image_url": "https://example.com/a.png"}


def test_sweep_removes_old_files_no_live_task_owns(store: TaskStore) -> None:
    files = store.input_files
    assert files is not None
    live = store.create(_new(1), BODY, inline=INLINE).id
    ended = store.create(_new(2), BODY, inline=INLINE).id
    store.finish(ended, TaskState.cancelled, {"success": False})
    files.write(ended, b"left by a crash after the end")
    orphan, young = _new(3).id, _new(4).id
    files.write(orphan, b"left by a crash before the commit")
    files.write(young, b"a submit between its write and its commit")
    old = time.time() - 7200
    for name in (live, ended, orphan):
        os.utime(files.root / name, (old, old))
    (files.root / "not-a-task").write_bytes(b"")

    assert files.sweep(store.live) == 2
    assert _files(store) == sorted([live, young, "not-a-task"])


def test_only_safe_task_ids_name_files(tmp_path: Path) -> None:
    files = InputFiles(tmp_path / "inputs")
    with pytest.raises(ValueError, match="not a task id"):
        files.write("../escape", b"x")
    assert not (tmp_path / "escape").exists()


def test_an_id_that_cannot_name_a_file_keeps_its_inputs_in_the_row(store: TaskStore) -> None:
    new = NewTask(id="a/b", owner="o", trace_id="t", request={}, priority=1, base_url="http://h/")
    store.create(new, BODY, inline=INLINE)
    assert _files(store) == []
    assert store.payload("a/b") == BODY
    assert store.finish("a/b", TaskState.cancelled, {"success": False})
