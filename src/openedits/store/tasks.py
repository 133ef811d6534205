"""TaskStore: tasks in SQL, with leases, and every state change through one guarded transition."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    case,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from openedits.schemas import TaskState
from openedits.store._inputs import IN_FILE, InlineInput, InputFiles, pack, unpack
from openedits.store._inserts import InsertWriter, count_active
from openedits.store._rows import NewTask, TaskRow
from openedits.store._tables import task_payloads, tasks
from openedits.webhooks.outbox import owe_callback

__all__ = ["PRIORITY", "InlineInput", "NewTask", "TaskRow", "TaskStore"]

PRIORITY = {"turbo": 0, "fast": 1, "relax": 2}


# The column values of a task handed back to the queue (released, or its worker died).
_BACK_TO_PENDING: dict[str, Any] = {
    "state": TaskState.pending.value,
    "lease_owner": None,
    "lease_expires_at": None,
    "started_at": None,
    "progress": 0,
}


def _ended(
    state: TaskState, response: dict[str, Any], error_status: int | None, now: float
) -> dict[str, Any]:
    """The column values of a task's end, whichever path ends it."""
    return {
        "state": state.value,
        "response": response,
        "error_status": error_status,
        "finished_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
    }


class TaskStore:
    """Tasks in a SQL database. Thread-safe; every method is one short transaction."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float] = time.time,
        inputs_dir: Path | None = None,
    ) -> None:
        """`inputs_dir`: where inline inputs go, one file per live task, instead of into the
        database (a single-host store: every process that reads them shares the folder)."""
        self.engine = engine
        self.clock = clock
        self._inserts = InsertWriter(engine)
        self.input_files = InputFiles(inputs_dir) if inputs_dir is not None else None

    # --- creating and reading

    def create(
        self,
        new: NewTask,
        payload: dict[str, Any],
        *,
        inline: Mapping[str, InlineInput] | None = None,
        queue_max: int | None = None,
    ) -> TaskRow:
        """Insert a pending task and its submit body, in one transaction; an (owner,
        idempotency_key) clash raises IntegrityError.

        `inline` holds inputs sent inline (data: URIs, bare base64), kept in the payload's
        `data` column instead of in its JSON body; `payload()` puts them back. With
        `queue_max`, the count of active tasks and the insert are one atomic step (QueueFull
        when the queue is at the bound), whatever number of threads and processes submit at
        once. Concurrent calls are written together (InsertWriter); each returns once its
        task is committed.
        """
        now = self.clock()
        values = {
            "id": new.id,
            "owner": new.owner,
            "trace_id": new.trace_id,
            "state": TaskState.pending.value,
            "priority": new.priority,
            "request": new.request,
            "response": None,
            "error_status": None,
            "progress": 0,
            "base_url": new.base_url,
            "callback_url": new.callback_url,
            "seeds": None,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
            "lease_owner": None,
            "lease_expires_at": None,
            "attempts": 0,
            "cancel_requested": False,
            "idempotency_key": new.idempotency_key,
            "request_hash": new.request_hash,
        }
        body, data = pack(payload, inline or {})
        files = self.input_files if data and InputFiles.holds(new.id) else None
        if files is not None:
            # Written before the row is committed, outside the write slot (see InputFiles).
            assert data is not None
            files.write(new.id, data)
            body, data = {**body, IN_FILE: True}, None
        try:
            self._inserts.insert(
                values, {"task_id": new.id, "body": body, "data": data}, queue_max=queue_max
            )
        except BaseException:
            if files is not None:
                files.delete(new.id)
            raise
        return TaskRow.from_mapping(values)

    def get(self, task_id: str, *, owner: str | None = None) -> TaskRow | None:
        """The task, or None when it does not exist or belongs to another owner."""
        query = select(tasks).where(tasks.c.id == task_id)
        if owner is not None:
            query = query.where(tasks.c.owner == owner)
        with self.engine.connect() as conn:
            m = conn.execute(query).mappings().first()
        return TaskRow.from_mapping(m) if m else None

    def payload(self, task_id: str) -> dict[str, Any] | None:
        """The submit body as sent (inline inputs as data: URIs or base64 again), while the
        task has not ended."""
        query = select(task_payloads.c.body, task_payloads.c.data).where(
            task_payloads.c.task_id == task_id
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None or row.body is None:
            return None
        data = row.data
        if row.body.get(IN_FILE):
            data = self.input_files.read(task_id) if self.input_files is not None else None
            if data is None:
                return None  # the file was lost: the inputs are gone, as after an end
        return unpack(row.body, data)

    def live(self, task_ids: Collection[str]) -> set[str]:
        """Those of `task_ids` that are pending or running."""
        query = select(tasks.c.id).where(
            tasks.c.id.in_(list(task_ids)),
            tasks.c.state.in_([TaskState.pending.value, TaskState.running.value]),
        )
        with self.engine.connect() as conn:
            return set(conn.execute(query).scalars())

    def _drop_inputs(self, task_id: str) -> None:
        # After the commit that deleted the payload row: a crash in between leaves a file that
        # InputFiles.sweep removes, never a live task without its inputs.
        if self.input_files is not None:
            self.input_files.delete(task_id)

    def get_by_trace(self, trace_id: str, *, owner: str | None = None) -> TaskRow | None:
        """The task a submit with this trace id created."""
        query = select(tasks).where(tasks.c.trace_id == trace_id)
        if owner is not None:
            query = query.where(tasks.c.owner == owner)
        with self.engine.connect() as conn:
            m = conn.execute(query.limit(1)).mappings().first()
        return TaskRow.from_mapping(m) if m else None

    def get_by_idempotency_key(self, owner: str, key: str) -> TaskRow | None:
        """The task an earlier submit with this key and owner created."""
        query = select(tasks).where(tasks.c.owner == owner, tasks.c.idempotency_key == key)
        with self.engine.connect() as conn:
            m = conn.execute(query).mappings().first()
        return TaskRow.from_mapping(m) if m else None

    def page(
        self,
        *,
        owner: str | None,
        ids: Sequence[str] | None = None,
        trace_ids: Sequence[str] | None = None,
        states: Sequence[TaskState] | None = None,
        offset: int = 0,
        limit: int = 12,
    ) -> tuple[list[TaskRow], int]:
        """A page of tasks, newest first, and the total that match."""
        conditions = []
        if owner is not None:
            conditions.append(tasks.c.owner == owner)
        if states is not None:
            conditions.append(tasks.c.state.in_([s.value for s in states]))
        if ids is not None:
            conditions.append(tasks.c.id.in_(list(ids)))
        if trace_ids is not None:
            conditions.append(tasks.c.trace_id.in_(list(trace_ids)))
        where = and_(True, *conditions)
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(tasks).where(where)).scalar_one()
            rows = conn.execute(
                select(tasks)
                .where(where)
                .order_by(tasks.c.created_at.desc(), tasks.c.id)
                .offset(offset)
                .limit(limit)
            ).mappings()
            return [TaskRow.from_mapping(m) for m in rows], int(total)

    def count_active(self) -> int:
        """Tasks pending or running: the queue's depth."""
        with self.engine.connect() as conn:
            return count_active(conn)

    def pending(self, *, created_before: float, limit: int = 1000) -> list[tuple[str, int]]:
        """(id, priority) of pending tasks created before `created_before`, oldest first: what
        a broker that lost its messages must be told again."""
        query = (
            select(tasks.c.id, tasks.c.priority)
            .where(tasks.c.state == TaskState.pending.value, tasks.c.created_at < created_before)
            .order_by(tasks.c.created_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [(str(i), int(p)) for i, p in conn.execute(query).all()]

    # --- the one guarded transition

    def _transition(
        self,
        task_id: str,
        *,
        from_states: Sequence[TaskState],
        values: dict[str, Any],
        lease_owner: str | None = None,
        also: Sequence[ColumnElement[bool]] = (),
        then: Callable[[Connection], None] | None = None,
    ) -> bool:
        """Apply `values` only if the task is in one of `from_states` (and, when given, still
        leased by `lease_owner`, and matching the `also` conditions). The WHERE clause makes the
        check and the write one atomic step, so no path (a late worker, a second process, a
        second reaper) can act on a state it read earlier and that has changed since.
        `then` runs in the same transaction, only when the transition happened."""
        conditions = [tasks.c.id == task_id, tasks.c.state.in_([s.value for s in from_states])]
        if lease_owner is not None:
            conditions.append(tasks.c.lease_owner == lease_owner)
        conditions.extend(also)
        with self.engine.begin() as conn:
            result = conn.execute(update(tasks).where(*conditions).values(**values))
            if result.rowcount != 1:
                return False
            if then is not None:
                then(conn)
            return True

    def _on_end(
        self, task_id: str, response: dict[str, Any], now: float
    ) -> Callable[[Connection], None]:
        """The writes that go with a task's end, in the same transaction as the state change:
        the callback it owes is queued in the outbox (so no reader can see the task ended while
        its callback is not yet in the store), and the client's inputs are deleted (so a crash
        right after the end cannot keep them forever)."""

        def write(conn: Connection) -> None:
            url = conn.execute(
                select(tasks.c.callback_url).where(tasks.c.id == task_id)
            ).scalar_one_or_none()
            if url:
                owe_callback(conn, task_id=task_id, url=url, body=response, now=now)
            conn.execute(delete(task_payloads).where(task_payloads.c.task_id == task_id))

        return write

    def _end(
        self, task_id: str, response: dict[str, Any], now: float, **transition: Any
    ) -> bool:
        """A guarded transition to an end (every path that ends a task comes here): the
        `_on_end` writes in its transaction, then the task's input file removed."""
        ended = self._transition(task_id, then=self._on_end(task_id, response, now), **transition)
        if ended:
            self._drop_inputs(task_id)
        return ended

    @staticmethod
    def _leased() -> ColumnElement[bool]:
        """Running, or pending under a worker's reservation. The live states come first, on
        their own, so the database searches the few live tasks through the queue index: said
        as one OR, every claim scanned every ended task kept for retention (99 ms a claim with
        100,000 of them, measured)."""
        return and_(
            tasks.c.state.in_([TaskState.pending.value, TaskState.running.value]),
            or_(tasks.c.state == TaskState.running.value, tasks.c.lease_owner.is_not(None)),
        )

    def _lease_expired(self) -> ColumnElement[bool]:
        return or_(tasks.c.lease_expires_at.is_(None), tasks.c.lease_expires_at < self.clock())

    # --- workers
    #
    # A worker either claims a task straight to running (`claim_next`, for a worker that runs
    # it at once), or reserves it first (`reserve_next`: still pending, but leased, while its
    # inputs are fetched ahead of the device) and starts it when the device takes it (`start`).
    # A reserved task is pending to every reader: it has not started, a cancel ends it at
    # once, and a dead worker's reservation lapses with its lease like a running task's.

    def _order(self, skip_owners: Collection[str], below: int | None = None) -> Any:
        """Pending tasks no live lease holds, fairly ordered: priority (turbo, fast, relax);
        then the owner with the fewest tasks claimed or running (one token's burst cannot
        starve another token's next task); then the oldest. `skip_owners` are left out."""
        held = (
            select(tasks.c.owner, func.count().label("n"))
            .where(self._leased())
            .group_by(tasks.c.owner)
            .subquery()
        )
        query = (
            select(tasks.c.id)
            .select_from(tasks.outerjoin(held, held.c.owner == tasks.c.owner))
            .where(tasks.c.state == TaskState.pending.value, self._lease_expired())
            .order_by(tasks.c.priority, func.coalesce(held.c.n, 0), tasks.c.created_at)
            .limit(1)
            .with_for_update(skip_locked=True, of=tasks)
        )
        if skip_owners:
            query = query.where(tasks.c.owner.not_in(list(skip_owners)))
        if below is not None:
            query = query.where(tasks.c.priority < below)
        return query

    def _take_next(
        self, take: Callable[[str], bool], skip_owners: Collection[str], below: int | None = None
    ) -> TaskRow | None:
        for _ in range(20):
            with self.engine.connect() as conn:
                task_id = conn.execute(self._order(skip_owners, below)).scalar_one_or_none()
            if task_id is None:
                return None
            if take(task_id):
                return self.get(task_id)
        return None

    def claim_next(
        self, worker_id: str, lease_seconds: float, *, skip_owners: Collection[str] = ()
    ) -> TaskRow | None:
        """Take the next pending task (in fair order, see `_order`) to running under a lease."""
        return self._take_next(lambda t: self.claim(t, worker_id, lease_seconds), skip_owners)

    def claim(self, task_id: str, worker_id: str, lease_seconds: float) -> bool:
        """Take one pending task to running under a lease; False if it is no longer pending
        (or another worker holds it reserved)."""
        now = self.clock()
        return self._transition(
            task_id,
            from_states=[TaskState.pending],
            values={
                "state": TaskState.running.value,
                "started_at": now,
                "lease_owner": worker_id,
                "lease_expires_at": now + lease_seconds,
                "attempts": tasks.c.attempts + 1,
            },
            also=[self._lease_expired()],
        )

    def reserve_next(
        self,
        worker_id: str,
        lease_seconds: float,
        *,
        skip_owners: Collection[str] = (),
        below_priority: int | None = None,
    ) -> TaskRow | None:
        """Lease the next pending task (fair order; only those more urgent than
        `below_priority` when given) while it stays pending: its inputs are prepared before
        `start`. The attempt counts here, so an input that kills its worker every time is given
        up like a task that kills the engine."""

        def reserve(task_id: str) -> bool:
            now = self.clock()
            return self._transition(
                task_id,
                from_states=[TaskState.pending],
                values={
                    "lease_owner": worker_id,
                    "lease_expires_at": now + lease_seconds,
                    "attempts": tasks.c.attempts + 1,
                },
                also=[self._lease_expired()],
            )

        return self._take_next(reserve, skip_owners, below_priority)

    def start(
        self,
        task_id: str,
        worker_id: str,
        lease_seconds: float,
        *,
        seeds: list[int] | None = None,
        progress: int = 0,
    ) -> float | None:
        """A reserved task goes to running (the device took it), with its seeds and first
        progress in the same write; returns its started_at, or None when it is no longer this
        worker's (cancelled, or its reservation lapsed)."""
        now = self.clock()
        started = self._transition(
            task_id,
            from_states=[TaskState.pending],
            values={
                "state": TaskState.running.value,
                "started_at": now,
                "lease_expires_at": now + lease_seconds,
                "seeds": seeds,
                "progress": max(0, min(99, progress)),
            },
            lease_owner=worker_id,
        )
        return now if started else None

    def heartbeat(self, task_id: str, worker_id: str, lease_seconds: float) -> bool:
        """Extend the lease of a running or reserved task; False when the worker lost it
        (requeued, cancelled or ended elsewhere)."""
        return self._transition(
            task_id,
            from_states=[TaskState.pending, TaskState.running],
            values={"lease_expires_at": self.clock() + lease_seconds},
            lease_owner=worker_id,
        )

    def release(self, task_id: str, worker_id: str) -> bool:
        """Hand a reserved or running task back to pending (its worker is draining), as if it
        had never been claimed: the attempt is not counted. Only the lease holder can."""
        return self._transition(
            task_id,
            from_states=[TaskState.pending, TaskState.running],
            values={
                **_BACK_TO_PENDING,
                "attempts": case((tasks.c.attempts > 0, tasks.c.attempts - 1), else_=0),
            },
            lease_owner=worker_id,
        )

    def most_urgent_pending(self) -> int | None:
        """The priority of the most urgent pending task no worker holds, or None."""
        query = select(func.min(tasks.c.priority)).where(
            tasks.c.state == TaskState.pending.value, self._lease_expired()
        )
        with self.engine.connect() as conn:
            value = conn.execute(query).scalar_one_or_none()
        return int(value) if value is not None else None

    def cancels_requested(self, task_ids: Collection[str]) -> set[str]:
        """Of `task_ids`, those asked to stop, ended, or gone: a worker holding them waiting
        drops them at once."""
        if not task_ids:
            return set()
        query = select(tasks.c.id, tasks.c.cancel_requested, tasks.c.state).where(
            tasks.c.id.in_(list(task_ids))
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        live = {r[0] for r in rows if not r[1] and not TaskState(r[2]).is_terminal()}
        return set(task_ids) - live

    def set_progress(
        self, task_id: str, worker_id: str, progress: int, lease_seconds: float
    ) -> bool:
        """Record progress (0..99 while running) and extend the lease in the same write."""
        return self._transition(
            task_id,
            from_states=[TaskState.running],
            values={
                "progress": max(0, min(99, progress)),
                "lease_expires_at": self.clock() + lease_seconds,
            },
            lease_owner=worker_id,
        )

    def set_seeds(self, task_id: str, worker_id: str, seeds: list[int]) -> bool:
        """Record the per-variant seeds, so an edit can be reproduced (lease holder only)."""
        return self._transition(
            task_id, from_states=[TaskState.running], values={"seeds": seeds},
            lease_owner=worker_id,
        )

    def finish(
        self,
        task_id: str,
        state: TaskState,
        response: dict[str, Any],
        *,
        error_status: int | None = None,
        worker_id: str | None = None,
        timings: dict[str, float] | None = None,
        notes: list[str] | None = None,
    ) -> bool:
        """End a task. A running or reserved task only by its lease holder (`worker_id`);
        without one, only a pending task (a cancel before it ran). A callback the task owes is
        queued in the outbox, its inputs deleted, and `timings` (seconds per phase) and `notes`
        kept, in the same transaction."""
        if not state.is_terminal():
            raise ValueError(f"finish needs a terminal state, not {state.value}")
        now = self.clock()
        values = _ended(state, response, error_status, now)
        if timings is not None:
            values["timings"] = timings
        if notes:
            values["notes"] = notes
        if state is TaskState.succeeded:
            values["progress"] = 100
        from_states = (
            [TaskState.running, TaskState.pending] if worker_id else [TaskState.pending]
        )
        return self._end(
            task_id, response, now, from_states=from_states, values=values, lease_owner=worker_id
        )

    def request_cancel(self, task_id: str) -> bool:
        """Flag a running task for cancellation at its next engine step."""
        return self._transition(
            task_id, from_states=[TaskState.running], values={"cancel_requested": True}
        )

    def cancel_requested(self, task_id: str) -> bool:
        """True when the task was asked to stop, or has already ended."""
        query = select(tasks.c.cancel_requested, tasks.c.state).where(tasks.c.id == task_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return True
        return bool(row[0]) or TaskState(row[1]).is_terminal()

    def requeue_expired(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """Send tasks whose lease ran out (their worker died) back to pending: running ones,
        and reserved ones (pending, their lease cleared).

        Returns (requeued ids, ids left for the caller to fail because they used up
        `max_attempts`: a task that kills its worker every time must not loop forever)."""
        expired = and_(self._leased(), self._lease_expired())
        with self.engine.connect() as conn:
            rows = conn.execute(select(tasks.c.id, tasks.c.attempts).where(expired)).all()
        requeued: list[str] = []
        exhausted: list[str] = []
        for task_id, attempts in rows:
            if attempts >= max_attempts:
                exhausted.append(task_id)
                continue
            if self._transition(
                task_id,
                from_states=[TaskState.running, TaskState.pending],
                values=_BACK_TO_PENDING,
                # Re-checked in the write: another reaper may have requeued the task and a
                # worker claimed it under a fresh lease since the select above.
                also=[self._leased(), self._lease_expired()],
            ):
                requeued.append(task_id)
        return requeued, exhausted

    def fail_expired(self, task_id: str, response: dict[str, Any], error_status: int) -> bool:
        """Fail a running (or reserved) task whose lease expired after its last allowed
        attempt."""
        now = self.clock()
        return self._end(
            task_id,
            response,
            now,
            from_states=[TaskState.running, TaskState.pending],
            values=_ended(TaskState.failed, response, error_status, now),
            also=[self._leased(), self._lease_expired()],
        )

    def ended_before(self, cutoff: float, limit: int = 500) -> list[str]:
        """Ids of tasks that ended before `cutoff` (Unix seconds), oldest first."""
        terminal = [s.value for s in TaskState if s.is_terminal()]
        query = (
            select(tasks.c.id)
            .where(tasks.c.state.in_(terminal), tasks.c.finished_at < cutoff)
            .order_by(tasks.c.finished_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def forget(self, task_id: str, cutoff: float) -> bool:
        """Delete an ended task that finished before `cutoff`; never a live one."""
        terminal = [s.value for s in TaskState if s.is_terminal()]
        with self.engine.begin() as conn:
            result = conn.execute(
                delete(tasks).where(
                    tasks.c.id == task_id,
                    tasks.c.state.in_(terminal),
                    tasks.c.finished_at < cutoff,
                )
            )
            conn.execute(delete(task_payloads).where(task_payloads.c.task_id == task_id))
            forgotten = result.rowcount == 1
        if forgotten:
            self._drop_inputs(task_id)
        return forgotten

    def is_duplicate_key_error(self, error: Exception) -> bool:
        """True when an insert failed on the idempotency key's unique constraint."""
        return isinstance(error, IntegrityError)
