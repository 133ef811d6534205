"""CeleryDispatcher and the worker's task: ids after commit, duplicates dropped, lost messages
re-published (a dead worker's task, an empty Redis, a message lost any other way)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from openedits.runtime import Runtime
from openedits.schemas import TaskState
from openedits.settings import Settings
from openedits.store.tasks import NewTask
from openedits.workers.celery_app import execute
from openedits.workers.celery_dispatch import BROKER_MARKER, CeleryDispatcher
from openedits.workers.events import EventBus
from tests.conftest import data_uri, fresh_postgres
from tests.engines.contract import make_test_image
from tests.fakes import FakeClock, FakeEngine
from tests.scale._fleet import REDIS_URL, flush_redis, needs_services
from tests.servers import free_port

pytestmark = [pytest.mark.services, needs_services]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def dispatcher(tmp_path: Path, clock: FakeClock) -> Iterator[CeleryDispatcher]:
    flush_redis()
    with fresh_postgres() as db_url:
        settings = Settings(broker_url=REDIS_URL, database_url=db_url,
                            blobs_url=f"file://{tmp_path / 'files'}", lease_seconds=3,
                            reaper_interval_seconds=0.5, allow_private_urls=True)
        rt = Runtime.build(settings, engine=FakeEngine(), bus=EventBus(), clock=clock)
        d = CeleryDispatcher(rt)
        yield d
        rt.close()


def _pending(rt: Runtime, i: int) -> str:
    task_id = f"{i:08d}-0000-0000-0000-000000000000"
    rt.store.create(NewTask(id=task_id, owner="o", trace_id=f"t{i}", request={}, priority=i % 3,
                            base_url="http://h/"),
                    {"image_url": data_uri(make_test_image((32, 24))), "prompt": "x"})
    return task_id


def test_submit_publishes_the_id_and_a_worker_runs_it_once(dispatcher: CeleryDispatcher) -> None:
    rt = dispatcher.rt
    task_id = _pending(rt, 1)
    dispatcher.submit(task_id, 1)
    assert dispatcher.queue_size() == 1
    assert execute(rt, task_id, "w1") is TaskState.succeeded
    # A second delivery of the same message (redelivery, a re-publish) is dropped.
    assert execute(rt, task_id, "w2") is None
    row = rt.store.get(task_id)
    assert row is not None and row.attempts == 1 and row.state is TaskState.succeeded


def test_a_message_for_a_cancelled_task_is_dropped(dispatcher: CeleryDispatcher) -> None:
    rt = dispatcher.rt
    task_id = _pending(rt, 2)
    assert rt.store.finish(task_id, TaskState.cancelled, {"success": False})
    assert execute(rt, task_id, "w1") is None


def test_an_empty_broker_gets_every_pending_task_again(dispatcher: CeleryDispatcher) -> None:
    rt = dispatcher.rt
    for i in range(3):
        _pending(rt, i)
    dispatcher.reap_once()  # first sight of this broker: it sets the marker and re-publishes
    assert dispatcher.queue_size() == 3
    dispatcher.reap_once()  # marker there, queue not empty: nothing more
    assert dispatcher.queue_size() == 3
    flush_redis()  # Redis restarted empty
    dispatcher.reap_once()
    assert dispatcher.queue_size() == 3
    assert dispatcher._client().get(BROKER_MARKER) is not None


def test_pending_tasks_with_an_empty_queue_are_published_again(
    dispatcher: CeleryDispatcher, clock: FakeClock
) -> None:
    rt = dispatcher.rt
    dispatcher.reap_once()  # sets the marker
    task_id = _pending(rt, 4)  # committed, but its node died before publishing
    dispatcher.reap_once()
    assert dispatcher.queue_size() == 0  # too recent: its publish may still be on its way
    clock.advance(5)
    dispatcher.reap_once()
    assert dispatcher.queue_size() == 1
    assert execute(rt, task_id, "w") is TaskState.succeeded


def test_a_dead_workers_task_is_requeued_and_published(
    dispatcher: CeleryDispatcher, clock: FakeClock
) -> None:
    rt = dispatcher.rt
    dispatcher.reap_once()
    task_id = _pending(rt, 5)
    assert rt.store.claim(task_id, "dead-worker", 3)
    dispatcher.reap_once()
    assert dispatcher.queue_size() == 0
    clock.advance(4)  # the lease ran out
    dispatcher.reap_once()
    row = rt.store.get(task_id)
    assert row is not None and row.state is TaskState.pending
    assert dispatcher.queue_size() == 1
    assert execute(rt, task_id, "w") is TaskState.succeeded


def _redis_server(port: int, folder: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                             "--save", "", "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def test_submits_while_the_broker_is_down_wait_for_the_reaper(tmp_path: Path) -> None:
    port = free_port()
    with fresh_postgres() as db_url:
        settings = Settings(broker_url=f"redis://127.0.0.1:{port}/0", database_url=db_url,
                            blobs_url=f"file://{tmp_path / 'files'}")
        rt = Runtime.build(settings, engine=FakeEngine(), bus=EventBus())
        dispatcher = CeleryDispatcher(rt)
        ids = [_pending(rt, i) for i in range(3)]
        started = time.monotonic()
        for task_id in ids:
            dispatcher.submit(task_id, 1)  # the first fails; the others skip the broker
        assert time.monotonic() - started < 20
        assert set(dispatcher._unsent) == set(ids)
        server = _redis_server(port, tmp_path)  # the broker is back
        try:
            dispatcher.reap_once()
            assert dispatcher._unsent == {}
            assert dispatcher.queue_size() >= 3
        finally:
            server.terminate()
            server.wait(10)
            rt.close()
