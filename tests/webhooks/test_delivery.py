"""The delivery loop against real loopback receivers, with time driven by a FakeClock."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Callable, Iterator
from email.utils import formatdate

import pytest
from sqlalchemy import Engine, text
from standardwebhooks import Webhook

from openedits.settings import Settings
from openedits.store.database import create_db_engine, migrate
from openedits.webhooks import (
    DeliveryLoop,
    DeliveryState,
    Outbox,
    Outcome,
    owe_callback,
    parse_retry_after,
    scheduled_delay,
)
from tests.fakes import FakeClock, hanging_listener, serve_raw, serve_receiver

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BODY = {"success": True, "task_id": "t-1", "progress": 100, "image_url": "http://x/grid.png"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def db(db_url: str) -> Iterator[Engine]:
    engine = create_db_engine(db_url)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _loop(db: Engine, clock: FakeClock, node: str = "node-a",
          on_outcome: Callable[[str], None] | None = None, **settings: object) -> DeliveryLoop:
    values: dict[str, object] = {"allow_private_urls": True,
                                 "webhook_retry_delays": "0.1s,0.2s,0.3s",
                                 "webhook_timeout_seconds": 2, **settings}
    s = Settings(**values)  # type: ignore[arg-type]
    return DeliveryLoop(Outbox(db, clock=clock), secret=lambda: SECRET, settings=s, clock=clock,
                        rng=random.Random(7), node=node, on_outcome=on_outcome)


def _owe(db: Engine, url: str, now: float, task_id: str = "t-1") -> str:
    with db.begin() as conn:
        return owe_callback(conn, task_id=task_id, url=url, body={**BODY, "task_id": task_id},
                            now=now)


def test_fails_then_succeeds_with_the_same_signed_id(db: Engine, clock: FakeClock) -> None:
    loop = _loop(db, clock)
    with serve_receiver() as receiver:
        receiver.script = [(500, {}), (200, {})]
        delivery_id = _owe(db, receiver.url + "/hook", clock())
        [first] = loop.run_once()
        assert first.outcome is Outcome.retry and first.status == 500
        assert first.next_attempt_at is not None
        assert 0.085 <= first.next_attempt_at - clock() <= 0.115  # 0.1 s ±15 % jitter
        assert loop.run_once() == []  # not due yet: no sleeping, the clock decides
        clock.advance(0.12)
        [second] = loop.run_once()
        got = receiver.wait_for(2)
    assert second.outcome is Outcome.delivered
    assert [r.path for r in got] == ["/hook", "/hook"]
    assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"] == delivery_id
    assert got[0].body == got[1].body
    for r in got:
        assert Webhook(SECRET).verify(r.body, r.headers) == BODY
        assert r.headers["content-type"] == "application/json"
    delivery = loop.outbox.get(delivery_id)
    assert delivery is not None and delivery.state is DeliveryState.delivered
    history = loop.outbox.history([delivery_id])[delivery_id]
    assert [(a.number, a.status, a.outcome) for a in history] == [
        (1, 500, "retry"), (2, 200, "delivered")]
    assert all(a.duration_ms is not None and a.node == "node-a" for a in history)


def test_410_stops_delivery(db: Engine, clock: FakeClock) -> None:
    loop = _loop(db, clock)
    with serve_receiver() as receiver:
        receiver.script = [(410, {})]
        delivery_id = _owe(db, receiver.url, clock())
        [attempt] = loop.run_once()
        clock.advance(3600)
        assert loop.run_once() == []
        assert len(receiver.received) == 1
    assert attempt.outcome is Outcome.gone and attempt.next_attempt_at is None
    delivery = loop.outbox.get(delivery_id)
    assert delivery is not None and delivery.state is DeliveryState.failed
    assert delivery.last_status == 410 and "410" in (delivery.last_error or "")


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_is_honoured(db: Engine, clock: FakeClock, status: int) -> None:
    loop = _loop(db, clock)
    with serve_receiver() as receiver:
        receiver.script = [(status, {"Retry-After": "7"}), (200, {})]
        delivery_id = _owe(db, receiver.url, clock())
        [first] = loop.run_once()
        assert first.outcome is Outcome.retry
        assert first.next_attempt_at == pytest.approx(clock() + 7)  # not the 0.1 s schedule
        clock.advance(6.9)
        assert loop.run_once() == []
        clock.advance(0.2)
        [second] = loop.run_once()
    assert second.outcome is Outcome.delivered
    assert loop.outbox.history([delivery_id])[delivery_id][0].status == status


def test_retry_after_http_date_is_honoured(db: Engine, clock: FakeClock) -> None:
    loop = _loop(db, clock)
    with serve_receiver() as receiver:
        receiver.script = [(429, {"Retry-After": formatdate(clock() + 120, usegmt=True)})]
        _owe(db, receiver.url, clock())
        [first] = loop.run_once()
    assert first.next_attempt_at is not None
    assert 118 <= first.next_attempt_at - clock() <= 121


def test_redirect_is_not_followed_and_counts_as_failure(db: Engine, clock: FakeClock) -> None:
    loop = _loop(db, clock)
    with serve_receiver() as receiver:
        receiver.script = [(302, {"Location": receiver.url + "/elsewhere"}), (200, {})]
        _owe(db, receiver.url + "/hook", clock())
        [first] = loop.run_once()
        assert [r.path for r in receiver.received] == ["/hook"]
        clock.advance(1)
        [second] = loop.run_once()
        got = receiver.wait_for(2)
    assert first.outcome is Outcome.retry and first.status == 302
    assert first.error is not None and "redirect" in first.error and "/elsewhere" in first.error
    assert second.outcome is Outcome.delivered
    assert [r.path for r in got] == ["/hook", "/hook"]


def test_schedule_is_followed_then_given_up(db: Engine, clock: FakeClock) -> None:
    loop = _loop(db, clock)
    waits = []
    with serve_receiver() as receiver:
        receiver.script = [(500, {})]
        delivery_id = _owe(db, receiver.url, clock())
        while True:
            attempts = loop.run_once()
            if not attempts:
                break
            [attempt] = attempts
            if attempt.next_attempt_at is None:
                break
            waits.append(attempt.next_attempt_at - clock())
            clock.advance(attempt.next_attempt_at - clock())
    assert len(waits) == 3
    for wait, base in zip(waits, [0.1, 0.2, 0.3], strict=True):
        assert base * 0.85 <= wait <= base * 1.15
    assert attempt.outcome is Outcome.failed
    assert "given up after 4 attempts" in (attempt.error or "")
    delivery = loop.outbox.get(delivery_id)
    assert delivery is not None and delivery.state is DeliveryState.failed
    assert delivery.attempts == 4


def test_unreachable_receiver_is_retried(db: Engine, clock: FakeClock) -> None:
    loop = _loop(db, clock)
    _owe(db, f"http://127.0.0.1:{free_port()}/hook", clock())
    [attempt] = loop.run_once()
    assert attempt.outcome is Outcome.retry and attempt.status is None
    assert attempt.error and "could not be fetched" in attempt.error


def test_resend_requeues_a_failed_delivery_with_the_same_id(db: Engine, clock: FakeClock) -> None:
    loop = _loop(db, clock)
    with serve_receiver() as receiver:
        receiver.script = [(410, {}), (204, {})]
        delivery_id = _owe(db, receiver.url, clock())
        loop.run_once()
        requeued = loop.outbox.resend(delivery_id)
        assert requeued is not None and requeued.state is DeliveryState.pending
        [attempt] = loop.run_once()
        got = receiver.wait_for(2)
    assert attempt.outcome is Outcome.delivered
    assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"] == delivery_id
    assert loop.outbox.resend("msg_nope") is None


def test_a_lost_lease_gives_the_next_attempt_a_new_number(db: Engine, clock: FakeClock) -> None:
    a, b = _loop(db, clock, "node-a"), _loop(db, clock, "node-b")
    delivery_id = _owe(db, "http://127.0.0.1:9/unused", clock())
    [claim_a] = a.outbox.claim_due("node-a", limit=10, lease_seconds=30)
    # node-a "dies" mid-attempt: until its lease runs out nobody else may send.
    assert b.outbox.claim_due("node-b", limit=10, lease_seconds=30) == []
    clock.advance(31)
    [claim_b] = b.outbox.claim_due("node-b", limit=10, lease_seconds=30)
    assert (claim_a.number, claim_b.number) == (1, 2)
    # node-a's late report does not move the delivery on: node-b holds it now.
    assert not a.outbox.record(claim_a, outcome=Outcome.delivered, status=200, error=None,
                               duration_ms=1.0)
    history = a.outbox.history([delivery_id])[delivery_id]
    assert [(h.number, h.node) for h in history] == [(1, "node-a"), (2, "node-b")]
    assert history[1].to_json()["outcome"] == "interrupted"


def test_several_processes_never_claim_the_same_attempt(db: Engine, clock: FakeClock) -> None:
    ids = {_owe(db, "http://127.0.0.1:9/unused", clock(), task_id=f"t-{i}") for i in range(40)}
    claims: list[tuple[str, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def node(name: str) -> None:
        # Each node has its own engine: its own connection pool, as a separate process would.
        engine = create_db_engine(db.url.render_as_string(hide_password=False))
        outbox = Outbox(engine, clock=clock)
        start.wait()
        # Until nothing is due: a pass can come back empty-handed while others still claim
        # (all its candidates were taken), and on PostgreSQL the nodes truly run at once.
        for _ in range(200):
            for c in outbox.claim_due(name, limit=7, lease_seconds=60):
                with lock:
                    claims.append((c.delivery.id, c.number))
            with engine.connect() as conn:
                due = conn.execute(text(
                    "SELECT count(*) FROM webhook_deliveries WHERE state = 'pending' "
                    "AND next_attempt_at <= :now"), {"now": clock()}).scalar_one()
            if not due:
                break
        engine.dispose()

    threads = [threading.Thread(target=node, args=(f"n{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(claims) == sorted((i, 1) for i in ids)


def test_parse_retry_after() -> None:
    assert parse_retry_after("12", 0) == 12
    assert parse_retry_after(None, 0) is None
    assert parse_retry_after("soon", 0) is None
    assert parse_retry_after("99999999", 0) == 86_400
    assert parse_retry_after(formatdate(1000, usegmt=True), 990) == pytest.approx(10)
    assert parse_retry_after(formatdate(1000, usegmt=True), 2000) == 0


def test_scheduled_delay_jitters_and_ends() -> None:
    rng = random.Random(1)
    assert scheduled_delay([10.0], 2, rng) is None
    values = {scheduled_delay([10.0], 1, rng) for _ in range(50)}
    assert all(v is not None and 8.5 <= v <= 11.5 for v in values) and len(values) > 1


def test_a_bad_configured_secret_is_refused_with_advice(db: Engine, clock: FakeClock) -> None:
    loop = _loop(db, clock)
    loop._secret = lambda: "whsec_a"
    with pytest.raises(ValueError, match="OPENEDITS_WEBHOOK_SECRET"):
        loop.start()


def test_any_2xx_is_delivered_however_large_its_body(db: Engine, clock: FakeClock) -> None:
    # Issue 9.5: a 2 MB answer body used to count as a failure ("over the limit ...
    # OPENEDITS_MAX_IMAGE_BYTES") and the callback was sent again.
    loop = _loop(db, clock)
    with serve_receiver() as receiver:
        receiver.reply_body = b"x" * 2_000_000
        delivery_id = _owe(db, receiver.url, clock())
        [attempt] = loop.run_once()
        clock.advance(3600)
        assert loop.run_once() == []
        assert len(receiver.wait_for(1)) == 1
    assert (attempt.outcome, attempt.status, attempt.error) == (Outcome.delivered, 200, None)
    delivery = loop.outbox.get(delivery_id)
    assert delivery is not None and delivery.state is DeliveryState.delivered


def test_a_2xx_body_is_not_read_at_all(db: Engine, clock: FakeClock) -> None:
    # The receiver announces a gigabyte and then sends nothing more: reading it would time out.
    reply = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\npartial"
    loop = _loop(db, clock, webhook_timeout_seconds=30)
    with serve_raw(reply) as url:
        _owe(db, url, clock())
        [attempt] = loop.run_once()
    assert (attempt.outcome, attempt.status) == (Outcome.delivered, 200)


def test_a_failure_keeps_only_a_short_prefix_of_the_answer(db: Engine, clock: FakeClock) -> None:
    loop = _loop(db, clock)
    with serve_receiver() as receiver:
        receiver.script = [(500, {})]
        receiver.reply_body = b"database\n  exploded " * 100_000
        delivery_id = _owe(db, receiver.url, clock())
        [attempt] = loop.run_once()
    assert attempt.outcome is Outcome.retry and attempt.status == 500
    assert attempt.error is not None
    assert attempt.error.startswith("HTTP 500: database exploded database exploded")
    assert attempt.error.endswith("…") and len(attempt.error) < 260
    assert "OPENEDITS_MAX_IMAGE_BYTES" not in attempt.error
    [record] = loop.outbox.history([delivery_id])[delivery_id]
    assert record.error == attempt.error


def test_a_failure_that_stalls_mid_body_keeps_its_status(db: Engine, clock: FakeClock) -> None:
    reply = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9999\r\n\r\nbusy, try"
    loop = _loop(db, clock, webhook_timeout_seconds=0.5)
    with serve_raw(reply) as url:
        _owe(db, url, clock())
        [attempt] = loop.run_once()
    assert (attempt.outcome, attempt.status) == (Outcome.retry, 503)
    assert attempt.error == "HTTP 503: busy, try"


def test_outcomes_are_reported_and_pending_counted(db: Engine, clock: FakeClock) -> None:
    seen: list[str] = []
    loop = _loop(db, clock, on_outcome=seen.append)
    assert loop.outbox.pending_count() == 0
    with serve_receiver() as receiver:
        receiver.script = [(500, {}), (200, {}), (410, {})]
        _owe(db, receiver.url, clock(), task_id="t-1")
        assert loop.outbox.pending_count() == 1
        loop.run_once()
        assert loop.outbox.pending_count() == 1  # a retry is still owed
        clock.advance(1)
        loop.run_once()
        assert loop.outbox.pending_count() == 0
        _owe(db, receiver.url, clock(), task_id="t-2")
        loop.run_once()
    assert seen == ["retry", "delivered", "gone"]
    assert loop.outbox.pending_count() == 0


def test_a_failing_outcome_hook_changes_nothing(db: Engine, clock: FakeClock) -> None:
    def broken(outcome: str) -> None:
        raise RuntimeError("metrics are down")

    loop = _loop(db, clock, on_outcome=broken)
    with serve_receiver() as receiver:
        delivery_id = _owe(db, receiver.url, clock())
        [attempt] = loop.run_once()
    assert attempt.outcome is Outcome.delivered
    delivery = loop.outbox.get(delivery_id)
    assert delivery is not None and delivery.state is DeliveryState.delivered


def test_a_hanging_receiver_holds_one_progress_sender_not_all(db: Engine,
                                                               clock: FakeClock) -> None:
    loop = _loop(db, clock, webhook_timeout_seconds=30)
    loop.start()
    try:
        with serve_receiver() as receiver, hanging_listener() as hanging:
            body = {"task_id": "t", "progress": 5}
            assert loop.post_progress("t-1", hanging + "/a", body)
            # The same destination is busy: dropped, not queued behind the hang.
            assert not loop.post_progress("t-2", hanging + "/b", body)
            assert loop.post_progress("t-3", receiver.url + "/hook", body)
            got = receiver.wait_for(1)
            assert [r.path for r in got] == ["/hook"]
            assert Webhook(SECRET).verify(got[0].body, got[0].headers) == body
    finally:
        loop.stop()


def test_due_leaves_out_exactly_the_origins_given(db: Engine, clock: FakeClock) -> None:
    outbox = Outbox(db, clock=clock)
    urls = ["http://h:1/a", "http://h:1", "http://h:1?x=1", "http://h:1#f",
            "http://h:12/a", "http://h:1.example/a", "http://h_1/a", "http://h%1/a"]
    for i, url in enumerate(urls):
        _owe(db, url, clock() + i * 0.001, task_id=f"t-{i}")
    clock.advance(1)
    assert [c.url for c in outbox.due(limit=20)] == urls
    left = [c.url for c in outbox.due(limit=20, exclude_origins=["http://h:1", "http://h_1"])]
    assert left == ["http://h:12/a", "http://h:1.example/a", "http://h%1/a"]
    assert outbox.next_due(exclude_origins=["http://h:1"]) == pytest.approx(
        clock() - 1 + 4 * 0.001)
