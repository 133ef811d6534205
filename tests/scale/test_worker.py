"""`openedits worker`: the Celery options it runs with, priorities from `mode`, readiness, and a
SIGTERM that hands running tasks back instead of leaving them to their lease."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from openedits.runtime import Runtime
from openedits.settings import Settings
from openedits.workers import celery_app
from openedits.workers.celery_app import QUEUE, WorkerOptions, make_celery, run_worker
from openedits.workers.celery_dispatch import CeleryDispatcher
from openedits.workers.events import EventBus
from tests.conftest import AUTH, data_uri, fresh_postgres
from tests.fakes import FakeEngine
from tests.scale._fleet import REDIS_URL, WorkerProcess, fleet_env, flush_redis, needs_services
from tests.servers import free_port

pytestmark = [pytest.mark.services, needs_services]


def _settings(db_url: str, tmp_path: Path, **values: Any) -> Settings:
    return Settings(broker_url=REDIS_URL, database_url=db_url, allow_private_urls=True,
                    blobs_url=f"file://{tmp_path / 'files'}", **values)


def test_celery_is_configured_as_the_redis_caveats_require(tmp_path: Path) -> None:
    settings = _settings("postgresql+psycopg://u@h/db", tmp_path, visibility_timeout_seconds=900)
    conf = make_celery(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_ignore_result
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 900
    assert conf.result_backend_transport_options["visibility_timeout"] == 900
    assert conf.visibility_timeout == 900
    assert conf.broker_transport_options["queue_order_strategy"] == "priority"
    assert conf.task_time_limit < 900


def test_worker_options_become_celery_arguments(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_main(self: Any, argv: list[str]) -> None:
        seen["argv"], seen["conf"] = argv, self.conf

    monkeypatch.setattr("celery.Celery.worker_main", fake_main)
    with fresh_postgres() as db_url:
        run_worker(_settings(db_url, tmp_path), WorkerOptions(
            devices=["cuda:0", "cuda:1"], concurrency=1, max_tasks_per_child=50,
            max_memory_per_child_kb=8 * 1024 * 1024, drain_seconds=12))
    argv = seen["argv"]
    assert "--pool=prefork" in argv and "--concurrency=2" in argv
    assert "--max-tasks-per-child=50" in argv and f"--max-memory-per-child={8 << 20}" in argv
    assert f"--queues={QUEUE}" in argv


def test_devices_are_dealt_to_pool_processes_by_index(monkeypatch: pytest.MonkeyPatch) -> None:
    options = WorkerOptions(devices=["cuda:0", "cuda:1"], concurrency=2)
    chosen = []
    for index in range(4):
        monkeypatch.setattr(celery_app, "_child_index", lambda i=index: i)
        chosen.append(options.devices[celery_app._child_index() % len(options.devices)])
    assert chosen == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def test_turbo_messages_are_taken_before_fast_before_relax(tmp_path: Path) -> None:
    flush_redis()
    with fresh_postgres() as db_url:
        rt = Runtime.build(_settings(db_url, tmp_path), engine=FakeEngine(), bus=EventBus())
        dispatcher = CeleryDispatcher(rt)
        for task_id, priority in [("relax", 2), ("fast", 1), ("turbo", 0), ("fast-2", 1)]:
            dispatcher.submit(task_id, priority)
        order = []
        with dispatcher.app.connection_for_read() as conn:
            q = conn.SimpleQueue(QUEUE)
            for _ in range(4):
                message = q.get(timeout=5)
                order.append(message.payload[0][0])
                message.ack()
            q.close()
        assert order == ["turbo", "fast", "fast-2", "relax"]
        assert dispatcher.ready() is None
        rt.close()


def test_readiness_names_a_broker_that_does_not_answer(tmp_path: Path) -> None:
    with fresh_postgres() as db_url:
        settings = _settings(db_url, tmp_path).model_copy(
            update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
        rt = Runtime.build(settings, engine=FakeEngine(), bus=EventBus())
        problem = CeleryDispatcher(rt).ready()
        rt.close()
    assert problem is not None and "OPENEDITS_BROKER_URL" in problem


@pytest.mark.slow
def test_sigterm_hands_a_running_task_back_at_once(tmp_path: Path, image) -> None:
    import sys

    from tests.servers import ServerProcess

    flush_redis()
    with fresh_postgres() as db_url:
        # A long lease: coming back within it proves the release, not the reaper.
        env = fleet_env(tmp_path / "data", db_url, OPENEDITS_LEASE_SECONDS="60")
        port = free_port()
        api = ServerProcess(env, port, [sys.executable, "-m", "tests._serve", str(port), "1"])
        worker = WorkerProcess(env, 1.0, "cpu", drain_seconds=0.5)
        try:
            api.wait_healthy()
            task_id = httpx.post(api.url + "/midjourney/edits", headers=AUTH, timeout=10,
                                 json={"image_url": data_uri(image), "prompt": "long",
                                       "async": True}).json()["task_id"]
            engine = create_engine(db_url)
            query = text("SELECT state, attempts FROM tasks WHERE id = :i")

            def row() -> tuple[str, int]:
                with engine.connect() as conn:
                    found = conn.execute(query, {"i": task_id}).one()
                return str(found[0]), int(found[1])

            deadline = time.monotonic() + 30
            while row()[0] != "running" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert row() == ("running", 1), worker.output()[-2000:]
            worker.proc.send_signal(signal.SIGTERM)  # the parent only, as `docker stop` does
            worker.proc.wait(20)
            assert row() == ("pending", 0), worker.output()[-3000:]  # back at once, not counted
            worker.stop()
            worker = WorkerProcess(env, 0.05, "cpu")
            deadline = time.monotonic() + 30
            while row()[0] != "succeeded" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert row() == ("succeeded", 1)
            engine.dispose()
        finally:
            worker.stop()
            api.stop()


class _Stopped(FakeEngine):
    """Stopped mid-edit, as billiard stops a pool process on SIGTERM (a SystemExit)."""

    def edit(self, *args: Any, **kwargs: Any) -> Any:
        raise SystemExit(-241)


@pytest.mark.parametrize("engine_class", [FakeEngine, _Stopped])
def test_a_pool_process_runs_its_task_or_hands_it_back(tmp_path: Path, image,
                                                       engine_class: type[FakeEngine]) -> None:
    flush_redis()
    with fresh_postgres() as db_url:
        settings = _settings(db_url, tmp_path)
        options = WorkerOptions(devices=["cpu"], engine_factory=lambda _s: engine_class())
        celery_app._init_process(settings, options)
        state = celery_app._WORKER["state"]
        try:
            assert state.rt.settings.device == "cpu" and state.worker_id.endswith(":cpu")
            from openedits.store.tasks import NewTask

            task_id = "00000009-0000-0000-0000-000000000000"
            state.rt.store.create(NewTask(id=task_id, owner="o", trace_id="t", request={},
                                          priority=1, base_url="http://h/"),
                                  {"image_url": data_uri(image), "prompt": "x"})
            run = make_celery(settings).tasks["openedits.run"]
            if engine_class is _Stopped:
                with pytest.raises(SystemExit):
                    run.run(task_id)
                row = state.rt.store.get(task_id)
                assert row is not None and (row.state.value, row.attempts) == ("pending", 0)
            else:
                run.run(task_id)
                row = state.rt.store.get(task_id)
                assert row is not None and row.state.value == "succeeded"
        finally:
            celery_app._close_process()
        assert "state" not in celery_app._WORKER


def test_the_reaper_thread_republishes_and_drain_stops_it(tmp_path: Path, image) -> None:
    flush_redis()
    with fresh_postgres() as db_url:
        settings = _settings(db_url, tmp_path, reaper_interval_seconds=0.1)
        rt = Runtime.build(settings, engine=FakeEngine())
        from openedits.store.tasks import NewTask

        rt.store.create(NewTask(id="0000000a-0000-0000-0000-000000000000", owner="o",
                                trace_id="t", request={}, priority=1, base_url="http://h/"),
                        {"image_url": data_uri(image), "prompt": "x"})
        dispatcher = CeleryDispatcher(rt)
        dispatcher.start()  # the broker has no marker: the pending task goes out again
        try:
            deadline = time.monotonic() + 10
            while dispatcher.queue_size() == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert dispatcher.queue_size() == 1
        finally:
            dispatcher.drain(1.0)
        assert dispatcher._thread is None
        dispatcher.stop()  # again: harmless
        rt.close()


def test_a_pool_process_exports_its_metrics_on_the_metrics_port(
    tmp_path: Path, image, monkeypatch: pytest.MonkeyPatch
) -> None:
    flush_redis()
    port = free_port()
    with fresh_postgres() as db_url:
        settings = _settings(db_url, tmp_path, metrics_port=port)
        options = WorkerOptions(devices=["cpu"], engine_factory=lambda _s: FakeEngine())
        monkeypatch.setattr(celery_app, "_child_index", lambda: 0)
        try:
            celery_app._init_process(settings, options)
            state = celery_app._WORKER["state"]
            from openedits.store.tasks import NewTask

            task_id = "0000000b-0000-0000-0000-000000000000"
            state.rt.store.create(NewTask(id=task_id, owner="o", trace_id="t", request={},
                                          priority=1, base_url="http://h/"),
                                  {"image_url": data_uri(image), "prompt": "x"})
            make_celery(settings).tasks["openedits.run"].run(task_id)
            text_ = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            assert 'openedits_tasks_finished_total{engine="fake",state="succeeded"} 1.0' in text_
            assert 'openedits_tasks{state="pending"} 0.0' in text_
        finally:
            celery_app._close_process()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
