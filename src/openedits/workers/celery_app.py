"""The Celery application: broker settings, the one task, and each worker process's Runtime.

The SQL task row stays the truth. A message carries only a task id; the worker that receives it
claims the row through the store's guarded transition (with the same lease and heartbeat as
in-process workers) and calls the same `run_task`, so a duplicate message, a message for a
cancelled task or a redelivery after a lost worker is harmless: the claim fails and the message
is dropped. Attempts are counted and capped in the database (the lease reaper), never by Celery.

Processes: `openedits worker` is Celery's prefork pool with one child per device (times
`--concurrency`). The parent never imports an engine; each child builds its Runtime and loads its
engine in `worker_process_init`, after the fork, so CUDA is only ever touched in the child that
owns the device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openedits.schemas import TaskState
from openedits.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

    from openedits.engines.base import Engine
    from openedits.runtime import Runtime

__all__ = [
    "QUEUE", "TASK_NAME", "WorkerOptions", "execute", "make_celery", "run_message", "run_worker",
]

log = logging.getLogger(__name__)

TASK_NAME = "openedits.run"
QUEUE = "openedits"
# Priorities from the task's mode (store.tasks.PRIORITY: turbo 0, fast 1, relax 2). Kombu's Redis
# transport keeps one list per step and pops the lowest step first.
PRIORITY_STEPS = [0, 1, 2]
# A task is stopped this long before the visibility timeout, so the broker never hands out a
# message whose task is still running.
_TIME_LIMIT_MARGIN = 60.0

EngineFactory = Callable[[Settings], "Engine"]


def make_celery(settings: Settings) -> Celery:
    """A Celery app for `settings.broker_url`, configured as SERVICES.md's spike verified."""
    try:
        from celery import Celery
    except ImportError:  # pragma: no cover - the scale extra is missing
        raise ValueError(
            "OPENEDITS_BROKER_URL needs Celery: pip install 'openedits[scale]'"
        ) from None
    visibility = settings.visibility_timeout_seconds
    app = Celery("openedits", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_time_limit=visibility - _TIME_LIMIT_MARGIN,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # A running task outlives a broker restart: its row, lease and heartbeat are in SQL.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # The three places Celery's Redis caveats name; all above the longest task.
        broker_transport_options={
            "visibility_timeout": visibility,
            "queue_order_strategy": "priority",
            "priority_steps": PRIORITY_STEPS,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "retry_on_timeout": True,
        },
        result_backend_transport_options={"visibility_timeout": visibility},
        visibility_timeout=visibility,
        task_default_priority=1,
    )

    # One module-level function for every app made here, so a process that makes several (the
    # tests) registers the same callable each time.
    app.task(name=TASK_NAME, ignore_result=True, acks_late=True, reject_on_worker_lost=True)(
        run_message
    )
    return app


def run_message(task_id: str) -> None:
    """The Celery task: run the task this message names, in this pool process's Runtime."""
    state = _WORKER.get("state")
    if state is None:
        raise RuntimeError("this process has no openedits Runtime (worker_process_init)")
    try:
        execute(state.rt, task_id, state.worker_id)
    except SystemExit:
        # The pool process is being stopped (SIGTERM, which billiard turns into SystemExit
        # here): hand the task back at once rather than leave it to its lease.
        _hand_back(state, task_id)
        raise


def execute(rt: Runtime, task_id: str, worker_id: str) -> TaskState | None:
    """Claim the task and run it; None when it was not pending (a duplicate or late message,
    a cancelled task, or one another worker runs): the message is then simply dropped."""
    from openedits.workers.runner import run_task

    if not rt.store.claim(task_id, worker_id, rt.settings.lease_seconds):
        log.info("message for a task that is not pending dropped", extra={"task_id": task_id})
        return None
    return run_task(rt, task_id, worker_id)


@dataclass
class WorkerOptions:
    """What `openedits worker` was asked for."""

    devices: list[str]
    concurrency: int = 1
    max_tasks_per_child: int | None = None
    max_memory_per_child_kb: int | None = None
    loglevel: str = "INFO"
    engine_factory: EngineFactory | None = None
    # SIGTERM: stop taking messages, give running tasks this long, then hand them back.
    drain_seconds: float = 30.0


@dataclass
class _ProcessState:
    rt: Runtime
    worker_id: str


# The Runtime of this worker child; set after the fork, read by the task.
_WORKER: dict[str, _ProcessState] = {}
# What stops this process's metrics endpoint (OPENEDITS_METRICS_PORT), when it serves one.
_METRICS_STOPS: list[Callable[[], None]] = []


def _hand_back(state: _ProcessState, task_id: str) -> None:
    """Return a task this process runs to pending, its attempt not counted, for another worker
    (the row says whether it was still ours: a task that already ended stays ended)."""
    try:
        if state.rt.store.release(task_id, state.worker_id):
            log.warning("task handed back to pending: the worker is stopping",
                        extra={"task_id": task_id})
    except Exception:
        log.exception("handing the task back failed; its lease lapses",
                      extra={"task_id": task_id})


def _child_index() -> int:
    from billiard.process import current_process

    return int(getattr(current_process(), "index", 0) or 0)


def _init_process(settings: Settings, options: WorkerOptions) -> None:
    """Build this child's Runtime and load its engine on its device (after the fork)."""
    from openedits.engines.registry import build_engine
    from openedits.runtime import Runtime
    from openedits.workers.redis_bus import RedisEventBus

    index = _child_index()
    device = options.devices[index % len(options.devices)]
    mine = settings.model_copy(update={"device": device})
    engine = options.engine_factory(mine) if options.engine_factory else build_engine(mine)
    assert mine.broker_url is not None
    bus = RedisEventBus(mine.broker_url, listen=False)
    rt = Runtime.build(mine, engine=engine, bus=bus)
    # Loaded now, not on the first task: a worker that cannot load its model says so at start.
    engine.load(device)
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{device}"
    _WORKER["state"] = _ProcessState(rt, worker_id)
    if mine.metrics_port is not None:
        from openedits.metrics import Metrics, serve_metrics

        # One port per pool process (base + its index): each exports its own tasks and device.
        metrics = Metrics()
        metrics.watch(rt)
        _METRICS_STOPS.append(serve_metrics(metrics, mine.metrics_port + index))
    log.info("worker process %d ready: engine %s on %s", index, engine.name, device)


def _close_process() -> None:
    while _METRICS_STOPS:
        _METRICS_STOPS.pop()()
    state = _WORKER.pop("state", None)
    if state is not None:
        state.rt.close()


def _stop_pool_processes() -> None:
    from billiard.process import active_children

    for child in active_children():
        if child.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)


def run_worker(settings: Settings, options: WorkerOptions) -> None:
    """Run a Celery worker in the foreground until it is stopped. SIGTERM drains: no new
    messages, running tasks get `options.drain_seconds` to finish, then those still running go
    back to pending (their attempt not counted) for another worker."""
    from celery.signals import worker_process_init, worker_process_shutdown, worker_shutting_down

    from openedits.store.database import create_db_engine, migrate

    # Migrate once here (SQL only, no engine, no CUDA), and drop the pool before forking.
    db = create_db_engine(settings.resolved_database_url)
    migrate(db)
    db.dispose()

    app = make_celery(settings)

    def on_shutting_down(**_: Any) -> None:
        # SIGTERM is Celery's warm shutdown: no new messages, and it would wait for running
        # tasks forever. Give them the drain time, then stop the pool processes, which hand
        # their tasks back to pending (_hand_back) for another worker.
        timer = threading.Timer(options.drain_seconds, _stop_pool_processes)
        timer.daemon = True
        timer.start()

    def on_init(**_: Any) -> None:
        _init_process(settings, options)

    def on_shutdown(**_: Any) -> None:
        _close_process()

    worker_shutting_down.connect(on_shutting_down, weak=False)
    worker_process_init.connect(on_init, weak=False)
    worker_process_shutdown.connect(on_shutdown, weak=False)
    argv = [
        "worker",
        "--pool=prefork",
        f"--concurrency={len(options.devices) * options.concurrency}",
        f"--queues={QUEUE}",
        f"--hostname=openedits-{os.getpid()}@%h",
        f"--loglevel={options.loglevel}",
        # Gossip, mingle and broker heartbeats only slow a start and add chatter: this fleet
        # coordinates through the database.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if options.max_tasks_per_child:
        argv.append(f"--max-tasks-per-child={options.max_tasks_per_child}")
    if options.max_memory_per_child_kb:
        argv.append(f"--max-memory-per-child={options.max_memory_per_child_kb}")
    app.worker_main(argv)
