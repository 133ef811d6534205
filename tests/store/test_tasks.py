"""TaskStore: guarded transitions, leases, requeue of dead workers, and migrations."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, inspect, select

from openedits.errors import QueueFull
from openedits.schemas import TaskState
from openedits.store._tables import task_payloads
from openedits.store.database import create_db_engine, migrate
from openedits.store.tasks import InlineInput, NewTask, TaskStore
from tests.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def store(db_url: str, clock: FakeClock) -> Iterator[TaskStore]:
    engine = create_db_engine(db_url)
    migrate(engine)
    yield TaskStore(engine, clock=clock)
    engine.dispose()


def _new(i: int, priority: int = 1) -> NewTask:
    return NewTask(id=f"{i:08d}-0000-0000-0000-000000000000", owner="o", trace_id=f"t{i}",
                   request={"prompt": "x"}, priority=priority, base_url="http://h/")


def test_migrations_create_the_schema_and_are_idempotent(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'm.sqlite'}")
    migrate(engine)
    migrate(engine)
    tables = set(inspect(engine).get_table_names())
    assert {"tasks", "task_payloads", "tokens", "kv", "alembic_version"} <= tables
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_claim_order_is_priority_then_age(store: TaskStore, clock: FakeClock) -> None:
    for i, priority in enumerate([2, 1, 0, 1]):
        clock.now += 1
        store.create(_new(i, priority), {"p": i})
    order = [store.claim_next("w", 30).id[:8] for _ in range(4)]
    assert order == ["00000002", "00000001", "00000003", "00000000"]
    assert store.claim_next("w", 30) is None


def test_terminal_states_never_change(store: TaskStore) -> None:
    row = store.create(_new(1), {})
    assert store.claim(row.id, "w", 30)
    assert not store.finish(row.id, TaskState.cancelled, {"success": False})  # not the holder
    assert store.finish(row.id, TaskState.cancelled, {"success": False}, worker_id="w")
    assert not store.finish(row.id, TaskState.succeeded, {"success": True}, worker_id="w")
    assert not store.finish(row.id, TaskState.failed, {"success": False})
    assert not store.claim(row.id, "w2", 30)
    assert store.get(row.id).state is TaskState.cancelled


def test_only_the_lease_holder_finishes(store: TaskStore) -> None:
    row = store.create(_new(1), {})
    store.claim(row.id, "w1", 30)
    assert not store.finish(row.id, TaskState.succeeded, {}, worker_id="w2")
    assert not store.heartbeat(row.id, "w2", 30)
    assert store.finish(row.id, TaskState.succeeded, {"success": True}, worker_id="w1")
    assert store.get(row.id).progress == 100


def test_expired_lease_requeues_then_gives_up(store: TaskStore, clock: FakeClock) -> None:
    row = store.create(_new(1), {})
    for attempt in range(1, 4):
        assert store.claim_next(f"w{attempt}", 10).id == row.id
        clock.now += 5
        assert store.requeue_expired(max_attempts=3) == ([], [])  # lease still live
        clock.now += 6
        requeued, exhausted = store.requeue_expired(max_attempts=3)
        if attempt < 3:
            assert requeued == [row.id] and exhausted == []
            assert store.get(row.id).state is TaskState.pending
        else:
            assert requeued == [] and exhausted == [row.id]
    assert store.fail_expired(row.id, {"success": False}, 500)
    assert store.get(row.id).state is TaskState.failed
    # A worker that wakes up late cannot finish what was given up.
    assert not store.finish(row.id, TaskState.succeeded, {}, worker_id="w3")


def test_a_second_reaper_cannot_requeue_a_reclaimed_task(
    store: TaskStore, clock: FakeClock
) -> None:
    row = store.create(_new(1), {})
    store.claim_next("w1", 10)
    clock.now += 11
    # Reaper A reads the task as expired; before it writes, reaper B requeues it and a live
    # worker claims it under a fresh lease. A's write must then find nothing to do.
    original = store._transition

    def late_reaper(*args, **kwargs):  # type: ignore[no-untyped-def]
        store._transition = original  # type: ignore[method-assign]
        assert store.requeue_expired(3) == ([row.id], [])
        assert store.claim_next("w2", 10).id == row.id
        return original(*args, **kwargs)

    store._transition = late_reaper  # type: ignore[method-assign]
    assert store.requeue_expired(3) == ([], [])
    assert store.get(row.id).lease_owner == "w2"
    assert store.heartbeat(row.id, "w2", 10)


def test_heartbeat_keeps_a_slow_task(store: TaskStore, clock: FakeClock) -> None:
    row = store.create(_new(1), {})
    store.claim_next("w", 10)
    for _ in range(5):
        clock.now += 8
        assert store.heartbeat(row.id, "w", 10)
        assert store.requeue_expired(3) == ([], [])


def test_cancel_flag_and_payload_lifecycle(store: TaskStore) -> None:
    row = store.create(_new(1), {"image_url": "data:..."})
    assert store.payload(row.id) == {"image_url": "data:..."}
    assert not store.request_cancel(row.id)  # only running tasks take the flag
    store.claim(row.id, "w", 30)
    assert not store.cancel_requested(row.id)
    assert store.request_cancel(row.id)
    assert store.cancel_requested(row.id)
    assert store.finish(row.id, TaskState.cancelled, {"success": False}, worker_id="w")
    assert store.payload(row.id) is None  # the inputs go with the task's end


def test_page_filters_and_counts(store: TaskStore, clock: FakeClock) -> None:
    for i in range(5):
        clock.now += 1
        store.create(_new(i), {})
    rows, total = store.page(owner="o", offset=1, limit=2)
    assert total == 5 and [r.id[:8] for r in rows] == ["00000003", "00000002"]
    rows, total = store.page(owner="other")
    assert (rows, total) == ([], 0)
    rows, total = store.page(owner=None, trace_ids=["t1", "t4"])
    assert total == 2


def test_inline_inputs_are_kept_outside_the_json_body_and_come_back_as_sent(
    store: TaskStore,
) -> None:
    encoded = base64.b64encode(bytes(range(256)) * 40)
    uri = "data:image/png;base64," + encoded.decode()
    row = store.create(_new(1), {"prompt": "x", "image_url": uri, "mask": encoded.decode(),
                                 "extra": [1]},
                       inline={"image_url": InlineInput("data:image/png;base64,", encoded),
                               "mask": InlineInput("", encoded)})
    assert store.payload(row.id) == {"prompt": "x", "image_url": uri, "mask": encoded.decode(),
                                     "extra": [1]}
    with store.engine.connect() as conn:
        body, data = conn.execute(
            select(task_payloads.c.body, task_payloads.c.data)).one()
    assert uri not in json.dumps(body) and data == encoded + encoded


def test_a_payload_stored_before_inline_packing_still_reads(store: TaskStore) -> None:
    row = store.create(_new(1), {"image_url": "data:image/png;base64,AAAA", "prompt": "x"})
    assert store.payload(row.id) == {"image_url": "data:image/png;base64,AAAA", "prompt": "x"}


@pytest.mark.timeout(60)
def test_the_queue_bound_holds_under_concurrent_submits_from_two_processes(
    tmp_path: Path,
) -> None:
    # Two stores on one file stand for two API processes: each has its own in-process write
    # slot, so only the database's own lock (BEGIN IMMEDIATE) can keep the bound.
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    engine = create_db_engine(url)
    migrate(engine)
    stores = [TaskStore(engine), TaskStore(create_db_engine(url))]

    def linger_after_counting(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        # Widens the window between the count and the insert, where a racing submit would
        # slip in if the two were not one atomic step.
        if "count(" in statement.lower():
            time.sleep(0.01)

    for store_ in stores:
        event.listen(store_.engine, "after_cursor_execute", linger_after_counting)
    accepted: list[str] = []
    refused: list[QueueFull] = []
    start = threading.Barrier(40)

    def submit(i: int) -> None:
        start.wait()
        try:
            accepted.append(stores[i % 2].create(_new(i), {}, queue_max=1).id)
        except QueueFull as exc:
            refused.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A bound of 1: two stores that both counted 0 before either inserted would both accept.
    assert len(accepted) == 1 and len(refused) == 39
    assert stores[0].count_active() == 1
    assert all(exc.headers["Retry-After"] for exc in refused)
    assert "OPENEDITS_QUEUE_MAX" in refused[0].message


@pytest.mark.timeout(60)
def test_concurrent_submits_are_written_together_and_one_bad_row_fails_alone(
    store: TaskStore,
) -> None:
    start = threading.Barrier(24)
    outcomes: dict[int, str] = {}

    def submit(i: int) -> None:
        # Every fourth submit reuses one idempotency key: one of them wins, the rest clash.
        new = NewTask(id=f"{i:08d}-0000-0000-0000-000000000000", owner="o", trace_id=f"t{i}",
                      request={}, priority=1, base_url="http://h/",
                      idempotency_key="same" if i % 4 == 0 else None)
        start.wait()
        try:
            store.create(new, {"i": i})
            outcomes[i] = "ok"
        except Exception as exc:
            outcomes[i] = "duplicate" if store.is_duplicate_key_error(exc) else repr(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()).count("duplicate") == 5, outcomes
    assert sorted(outcomes.values()).count("ok") == 19, outcomes
    assert all(store.payload(f"{i:08d}-0000-0000-0000-000000000000") == {"i": i}
               for i, outcome in outcomes.items() if outcome == "ok")
    assert store.page(owner="o", limit=100)[1] == 19


def _new_of(i: int, owner: str, priority: int = 1) -> NewTask:
    return NewTask(id=f"{i:08d}-0000-0000-0000-000000000000", owner=owner, trace_id=f"t{i}",
                   request={"prompt": "x"}, priority=priority, base_url="http://h/")


def test_claims_are_fair_between_owners(store: TaskStore, clock: FakeClock) -> None:
    # Owner a queues a burst, then b one task: b's comes next, because a already has one
    # running and b none. Priority still comes first.
    for i in range(5):
        clock.now += 1
        store.create(_new_of(i, "a"), {})
    assert store.claim_next("w", 30).id[:8] == "00000000"
    clock.now += 1
    store.create(_new_of(10, "b"), {})
    clock.now += 1
    store.create(_new_of(11, "c", priority=0), {})
    order = [store.claim_next("w", 30).id[:8] for _ in range(3)]
    assert order == ["00000011", "00000010", "00000001"]


def test_claims_skip_owners_at_their_cap(store: TaskStore, clock: FakeClock) -> None:
    for i, owner in enumerate(["a", "a", "b"]):
        clock.now += 1
        store.create(_new_of(i, owner), {})
    assert store.claim_next("w", 30, skip_owners={"a"}).id[:8] == "00000002"
    assert store.claim_next("w", 30, skip_owners={"a", "b"}) is None
    assert store.claim_next("w", 30).id[:8] == "00000000"


def test_release_hands_a_task_back_without_counting_the_attempt(store: TaskStore) -> None:
    row = store.create(_new(1), {"p": 1})
    assert store.claim(row.id, "w1", 30)
    assert not store.release(row.id, "w2")  # only the lease holder
    assert store.release(row.id, "w1")
    back = store.get(row.id)
    assert back.state is TaskState.pending and back.attempts == 0
    assert back.lease_owner is None and back.started_at is None
    assert not store.release(row.id, "w1")  # no longer running
    assert not store.heartbeat(row.id, "w1", 30)
    assert store.claim_next("w3", 30).attempts == 1
    assert store.payload(row.id) == {"p": 1}  # the inputs stay for the next run


def test_finish_keeps_the_timings_in_the_same_write(store: TaskStore) -> None:
    row = store.create(_new(1), {})
    store.claim(row.id, "w", 30)
    timings = {"queue": 0.5, "inputs": 0.1, "engine": 2.0, "results": 0.2, "total": 2.8}
    assert not store.finish(row.id, TaskState.succeeded, {}, worker_id="x", timings=timings)
    assert store.get(row.id).timings is None  # a refused finish writes nothing
    assert store.finish(row.id, TaskState.succeeded, {"success": True}, worker_id="w",
                        timings=timings)
    assert store.get(row.id).timings == timings


def test_a_reserved_task_stays_pending_until_started(store: TaskStore, clock: FakeClock) -> None:
    row = store.create(_new(1), {})
    held = store.reserve_next("w1", 10)
    assert held is not None and held.id == row.id
    assert held.state is TaskState.pending and held.started_at is None and held.attempts == 1
    assert store.claim_next("w2", 10) is None  # nobody else takes it while the lease lives
    assert store.reserve_next("w2", 10) is None
    assert store.heartbeat(row.id, "w1", 10)
    assert store.start(row.id, "w2", 10) is None  # only its holder starts it
    started = store.start(row.id, "w1", 10)
    assert started == clock.now
    assert store.get(row.id).state is TaskState.running
    assert store.get(row.id).attempts == 1  # starting is not another attempt


def test_a_cancel_ends_a_reserved_task_at_once(store: TaskStore) -> None:
    row = store.create(_new(1), {})
    store.reserve_next("w", 10)
    assert store.cancels_requested([row.id]) == set()
    assert store.finish(row.id, TaskState.cancelled, {"success": False})  # the pending path
    assert store.cancels_requested([row.id, "gone"]) == {row.id, "gone"}
    assert store.start(row.id, "w", 10) is None


def test_a_dead_workers_reservation_lapses(store: TaskStore, clock: FakeClock) -> None:
    row = store.create(_new(1), {})
    store.reserve_next("w1", 10)
    clock.now += 11
    assert store.requeue_expired(3) == ([row.id], [])
    assert store.get(row.id).lease_owner is None
    assert not store.heartbeat(row.id, "w1", 10)
    store.reserve_next("w2", 10)
    clock.now += 11
    assert store.requeue_expired(3) == ([row.id], [])
    store.reserve_next("w3", 10)
    clock.now += 11
    assert store.requeue_expired(3) == ([], [row.id])
    assert store.fail_expired(row.id, {"success": False}, 500)
    assert store.get(row.id).state is TaskState.failed


def test_an_idempotency_key_names_one_task_per_owner(store: TaskStore) -> None:
    def keyed(i: int, owner: str) -> NewTask:
        return NewTask(id=f"{i:08d}-0000-0000-0000-00000000000k", owner=owner, trace_id=f"k{i}",
                       request={}, priority=1, base_url="http://h/", idempotency_key="same",
                       request_hash="h")

    first = store.create(keyed(1, "o"), {})
    with pytest.raises(Exception) as raised:
        store.create(keyed(2, "o"), {})
    assert store.is_duplicate_key_error(raised.value)
    assert store.get_by_idempotency_key("o", "same") == first
    # Another owner's identical key is its own.
    assert store.create(keyed(3, "p"), {}).owner == "p"
    assert store.get(keyed(2, "o").id) is None


def test_claims_and_the_reaper_search_live_tasks_not_every_ended_one(tmp_path: Path) -> None:
    # Ended tasks stay in the table for the retention period (days: many thousands). A claim
    # or a reaper pass that scans them all costs time with every one kept (99 ms a claim at
    # 100,000 before this was fixed); each must only search the live ones through an index.
    engine = create_db_engine(f"sqlite:///{tmp_path / 'plan.sqlite'}")
    migrate(engine)
    store = TaskStore(engine, clock=FakeClock(1000.0))
    store.create(_new(1), {"p": 1})
    statements: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, sql: str, params: Any, context: Any, many: bool) -> None:
        if sql.lstrip().upper().startswith("SELECT") and "tasks" in sql:
            statements.append((sql, params))

    event.listen(engine, "before_cursor_execute", seen)
    try:
        assert store.reserve_next("w", 30) is not None
        store.claim_next("w2", 30)
        store.requeue_expired(3)
        store.most_urgent_pending()
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert len(statements) >= 4
    with engine.connect() as conn:
        for sql, params in statements:
            plan = [row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
            assert not [step for step in plan if step.startswith("SCAN tasks")], (sql, plan)
    engine.dispose()
