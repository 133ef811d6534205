"""The running delivery loop: receivers that hang delay only themselves, and several loops over
one outbox (API nodes) deliver each callback exactly once."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy import Engine
from standardwebhooks import Webhook

from openedits.runtime import Runtime
from openedits.settings import Settings
from openedits.store.database import create_db_engine, migrate
from openedits.webhooks import DeliveryLoop, DeliveryState, Outbox, owe_callback
from openedits.webhooks.delivery import PER_HOST
from tests.fakes import FakeClock, FakeEngine, hanging_listener, serve_receiver

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Engine]:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    yield engine
    engine.dispose()


def _owe(db: Engine, url: str, now: float, task_id: str) -> str:
    with db.begin() as conn:
        return owe_callback(conn, task_id=task_id, url=url,
                            body={"success": True, "task_id": task_id}, now=now)


def test_hanging_receivers_do_not_delay_a_healthy_one(db: Engine) -> None:
    # Issue 9.6: 8 receivers that never answer used to hold every sender for the whole
    # timeout, and a healthy receiver's callback arrived 7.8 s late behind them.
    clock = FakeClock()
    settings = Settings(allow_private_urls=True, webhook_timeout_seconds=60,
                        webhook_poll_seconds=0.2)
    loop = DeliveryLoop(Outbox(db, clock=clock), secret=lambda: SECRET, settings=settings,
                        clock=clock, rng=random.Random(3), node="node-a")
    with ExitStack() as stack:
        hanging = [stack.enter_context(hanging_listener()) for _ in range(8)]
        healthy = stack.enter_context(serve_receiver())
        # Each hanging receiver has a backlog, all due before the healthy callback.
        stuck = {
            url: [_owe(db, f"{url}/hook?n={j}", clock() - 10 + i, f"h-{i}-{j}") for j in range(3)]
            for i, url in enumerate(hanging)
        }
        wanted = _owe(db, healthy.url + "/hook", clock(), "healthy")
        loop.start()
        try:
            [got] = healthy.wait_for(1, timeout=30)
            # Read the hanging receivers' attempts while the healthy callback has just
            # landed: every one of them is still waiting on its receiver, none has timed out,
            # so the healthy callback did not wait behind any of them.
            history = loop.outbox.history([d for ids in stuck.values() for d in ids])
            deadline = time.monotonic() + 10
            while (d := loop.outbox.get(wanted)) and d.state is not DeliveryState.delivered:
                assert time.monotonic() < deadline, "the healthy delivery was never recorded"
                time.sleep(0.01)
        finally:
            stack.close()  # the hanging receivers close: their attempts end at once
            loop.stop()
    assert got.headers["webhook-id"] == wanted
    attempts = [a for rows in history.values() for a in rows]
    assert all(a.outcome is None for a in attempts), attempts
    # At most PER_HOST in flight per destination: the 8 hanging ones hold 16 senders, not all,
    # and the third callback of each waits for its own receiver.
    started = {url: sum(len(history[d]) for d in ids) for url, ids in stuck.items()}
    assert started == {url: PER_HOST for url in hanging}


def test_two_nodes_deliver_every_callback_exactly_once(tmp_path: Path) -> None:
    # Issue 11.6: the delivery loop runs in every API node; two Runtimes over one database
    # file race over the same outbox, and each callback arrives once, with one webhook-id.
    settings = Settings(data_dir=tmp_path, allow_private_urls=True, webhook_poll_seconds=0.05,
                        webhook_timeout_seconds=5)
    nodes = [Runtime.build(settings, engine=FakeEngine()) for _ in range(2)]
    secret = nodes[0].webhook_secret()
    assert nodes[1].webhook_secret() == secret  # one secret in the store: both sign alike
    loops = [DeliveryLoop.from_runtime(rt, node=f"node-{i}") for i, rt in enumerate(nodes)]
    try:
        with ExitStack() as stack:
            receivers = [stack.enter_context(serve_receiver()) for _ in range(4)]
            owed = {
                _owe(nodes[i % 2].db, f"{receivers[i % 4].url}/hook/{i}", time.time(), f"t-{i}")
                for i in range(60)
            }
            for loop in loops:
                loop.start()
            outbox = loops[0].outbox
            deadline = time.monotonic() + 60
            while outbox.pending_count():
                assert time.monotonic() < deadline, "callbacks were still owed after 60 s"
                time.sleep(0.05)
            for loop in loops:
                loop.stop()
            received = [r for receiver in receivers for r in receiver.received]
    finally:
        for rt in nodes:
            rt.close()
    ids = Counter(r.headers["webhook-id"] for r in received)
    assert set(ids) == owed and set(ids.values()) == {1}
    for r in received:
        assert Webhook(secret).verify(r.body, r.headers)["task_id"] == f"t-{r.path.split('/')[-1]}"
    deliveries, total = outbox.page(state=DeliveryState.delivered, limit=100)
    assert total == 60
    history = outbox.history([d.id for d in deliveries])
    assert all(len(attempts) == 1 for attempts in history.values())
