"""Task inserts: concurrent submits written together in one transaction (group commit), the queue
bound checked inside it, and SQLite's WAL checkpointed outside it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, insert, select, text
from sqlalchemy.exc import IntegrityError

from openedits.errors import QueueFull, ServerBusy
from openedits.schemas import TaskState
from openedits.store._tables import task_payloads, tasks

__all__ = ["InsertWriter", "count_active"]

_WAIT_SECONDS = 10.0
"""How long a submit waits for its batch to be written before it answers 503."""
_CHECKPOINT_BYTES = 8 << 20
"""Submits checkpoint SQLite's WAL after writing about this much (see _checkpoint_soon)."""
_ROW_BYTES = 2048
"""About what a task row and its payload body add besides the inline data."""
_QUEUE_LOCK_KEY = int.from_bytes(b"openedit", "big", signed=True)
"""The PostgreSQL advisory lock that serialises queue-bound checks."""

_ACTIVE = tasks.c.state.in_([TaskState.pending.value, TaskState.running.value])
_COUNT_ACTIVE = select(func.count()).select_from(tasks).where(_ACTIVE)
_COUNT_ACTIVE_UPTO = select(func.count()).select_from(
    select(tasks.c.id).where(_ACTIVE).limit(bindparam("upto")).subquery()
)
_INSERT_TASK = insert(tasks)
_INSERT_PAYLOAD = insert(task_payloads)


def count_active(conn: Connection, *, limit: int | None = None) -> int:
    """Tasks pending or running, counted up to `limit` at most (a full queue costs no scan)."""
    if limit is None:
        return int(conn.execute(_COUNT_ACTIVE).scalar_one())
    return int(conn.execute(_COUNT_ACTIVE_UPTO, {"upto": limit}).scalar_one())


@dataclass
class _Pending:
    """One submit waiting for its batch: its rows, its bound, and how it went."""

    task: dict[str, Any]
    payload: dict[str, Any]
    queue_max: int | None
    size: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class InsertWriter:
    """Writes new tasks for one TaskStore, many submits per transaction.

    A submit queues its rows, then waits for the write slot. Whoever holds the slot writes
    every submit queued so far in one transaction and wakes them all, so a burst costs one
    transaction (one lock, one count, one commit) per batch instead of one per task, and the
    slot's holder does not pay, per task, for getting the GIL back from every other thread
    after each database call. Each submit is still answered only after the commit that holds
    it, so nothing is acknowledged before it is durable.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._slot = threading.Lock()
        self._queued: list[_Pending] = []
        self._queued_lock = threading.Lock()
        self._sqlite = engine.dialect.name == "sqlite"
        self._checkpointing = threading.Lock()
        self._unchecked = 0  # bytes written to the WAL since this writer's last checkpoint

    def insert(
        self, task: dict[str, Any], payload: dict[str, Any], *, queue_max: int | None
    ) -> None:
        """Write one task and its payload row; raises QueueFull, ServerBusy (503: not written
        within the wait) or the database's error for this task (e.g. a duplicate key)."""
        mine = _Pending(task, payload, queue_max, len(payload.get("data") or b"") + _ROW_BYTES)
        with self._queued_lock:
            self._queued.append(mine)
        deadline = time.monotonic() + _WAIT_SECONDS
        while not mine.done.is_set():
            if not self._slot.acquire(timeout=max(0.0, deadline - time.monotonic())):
                with self._queued_lock:
                    if mine in self._queued:
                        self._queued.remove(mine)
                        raise ServerBusy(
                            f"the task store is busy (the task was not written within "
                            f"{_WAIT_SECONDS:g} s); retry shortly",
                            retry_after=2,
                        )
                mine.done.wait()  # a writer has taken it: its transaction ends soon
                break
            try:
                if not mine.done.is_set():
                    with self._queued_lock:
                        batch, self._queued = self._queued, []
                    self._write(batch)
            finally:
                self._slot.release()
        if mine.error is not None:
            raise mine.error
        self._checkpoint_soon()

    def _write(self, batch: list[_Pending]) -> None:
        try:
            try:
                self._transaction(batch)
            except IntegrityError as exc:
                if len(batch) == 1:
                    batch[0].error = exc
                else:
                    # One bad row (a duplicate idempotency key) must not fail the others:
                    # write each alone, each learning its own outcome.
                    for item in batch:
                        item.error = None
                        try:
                            self._transaction([item])
                        except Exception as one:
                            item.error = one
            except Exception as exc:
                # The database itself failed (locked past its timeout, gone): every submit in
                # the batch hears it, at once, rather than after one retry each.
                for item in batch:
                    item.error = exc
        finally:
            for item in batch:
                item.done.set()

    def _transaction(self, batch: list[_Pending]) -> None:
        bounds = [i.queue_max for i in batch if i.queue_max is not None]
        with self.engine.begin() as conn:
            accepted = batch
            if bounds:
                self._lock_queue(conn)
                active = count_active(conn, limit=max(bounds))
                accepted = []
                for item in batch:
                    if item.queue_max is not None and active >= item.queue_max:
                        item.error = QueueFull(
                            f"the queue holds {item.queue_max} tasks, its limit "
                            "(OPENEDITS_QUEUE_MAX); retry later",
                            retry_after=5,
                        )
                        continue
                    active += 1
                    accepted.append(item)
            if accepted:
                # Statements built once, parameters apart, many rows per call.
                conn.execute(_INSERT_TASK, [i.task for i in accepted])
                conn.execute(_INSERT_PAYLOAD, [i.payload for i in accepted])
                self._unchecked += sum(i.size for i in accepted)

    @staticmethod
    def _lock_queue(conn: Connection) -> None:
        """Make this transaction the only one counting and filling the queue until it ends.

        SQLite: BEGIN IMMEDIATE takes the database's write lock before the count, so no other
        connection (thread or process) can insert between the count and the insert.
        PostgreSQL: a transaction-scoped advisory lock does the same for every API process.
        (Other databases get no lock: the bound may then be passed by a few concurrent submits.)
        """
        dialect = conn.dialect.name
        if dialect == "sqlite":
            # pysqlite opens transactions itself only before DML; starting it here, explicitly,
            # makes the count below part of the same write transaction.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _QUEUE_LOCK_KEY})

    def _checkpoint_soon(self) -> None:
        """On SQLite, copy the WAL into the database once submits have written a few MB.

        SQLite's own checkpoint runs inside the commit that crosses its threshold, that is
        inside the write slot, so every submit queued behind it waited for pages to be copied
        and two fsyncs. Here it runs after the commit, outside the slot (a passive checkpoint
        never blocks writers), in one thread at a time. Durability is the WAL's either way.
        """
        if not self._sqlite or self._unchecked < _CHECKPOINT_BYTES:
            return
        if not self._checkpointing.acquire(blocking=False):
            return
        try:
            self._unchecked = 0
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            self._checkpointing.release()
