"""Prometheus metrics: a registry per app or worker; event-fed counters, scrape-time gauges."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from openedits.schemas import TaskState
from openedits.store._tables import tasks, webhook_deliveries
from openedits.workers.events import TaskEvent, TaskFinished

if TYPE_CHECKING:
    from openedits.runtime import Runtime
    from openedits.store.tasks import TaskRow

__all__ = ["CONTENT_TYPE", "PHASES", "Metrics", "RuntimeCollector", "serve_metrics"]

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
PHASES = ("queue", "inputs", "engine", "results", "total")
"""The phases of a task's `timings`, in the order they happen (total last)."""

# Edits take milliseconds (opencv) to minutes (diffusion on a CPU): buckets span both.
_EDIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# Most requests take milliseconds; a sync edit holds its request for the whole edit.
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """The metrics of one process, on its own registry (tests build many apps in one process,
    and the default global registry would refuse the second one's names)."""

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.submitted = Counter(
            "openedits_tasks_submitted", "Tasks accepted by this API process.",
            ["engine", "mode"], registry=r,
        )
        self.finished = Counter(
            "openedits_tasks_finished", "Tasks that ended, counted where they ended.",
            ["engine", "state"], registry=r,
        )
        self.edit_duration = Histogram(
            "openedits_edit_duration_seconds",
            "Seconds per phase of ended tasks (queue, inputs, engine, results, total).",
            ["engine", "phase"], buckets=_EDIT_BUCKETS, registry=r,
        )
        self.http_requests = Counter(
            "openedits_http_requests", "HTTP requests answered, by route template.",
            ["route", "method", "status"], registry=r,
        )
        self.http_duration = Histogram(
            "openedits_http_request_duration_seconds", "Seconds to answer, by route template.",
            ["route"], buckets=_HTTP_BUCKETS, registry=r,
        )
        self._webhooks: Counter | None = None
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    # --- feeding

    def task_submitted(self, engine: str, mode: str) -> None:
        """A new task was accepted (not an idempotent replay)."""
        self.submitted.labels(engine, mode).inc()

    def task_finished(self, engine: str, row: TaskRow) -> None:
        """Count an ended task and observe its phase timings (those it has)."""
        self.finished.labels(engine, row.state.value).inc()
        for phase, seconds in (row.timings or {}).items():
            if phase in PHASES and isinstance(seconds, int | float) and seconds >= 0:
                self.edit_duration.labels(engine, phase).observe(float(seconds))

    def hook_webhooks(self) -> Callable[[str], None]:
        """The callback the delivery loop calls with each attempt's outcome (delivered, retry,
        gone, failed). Until something calls this, `openedits_webhook_deliveries_total` is read
        from the outbox table at scrape time instead (see RuntimeCollector)."""
        if self._webhooks is None:
            self._webhooks = Counter(
                "openedits_webhook_deliveries", "Callback attempts made by this process.",
                ["outcome"], registry=self.registry,
            )
            # Every outcome shows from the first scrape, so a rate() over it never starts blank.
            for outcome in ("delivered", "retry", "gone", "failed"):
                self._webhooks.labels(outcome)
        counter = self._webhooks

        def attempted(outcome: str) -> None:
            counter.labels(outcome).inc()

        return attempted

    @property
    def webhooks_hooked(self) -> bool:
        """Whether attempts are counted in-process (the delivery loop calls the hook)."""
        return self._webhooks is not None

    def watch(self, rt: Runtime, *, count_finished: bool = True) -> None:
        """Expose the store's queue and the engine, and (with `count_finished`) count the ended
        tasks rt's bus reports: what an API process and a worker process both call once. Pass
        False where the bus also relays other processes' events (they count their own)."""
        self.registry.register(RuntimeCollector(rt, self))
        if not count_finished:
            return
        engine = rt.engine.name

        def on_event(event: TaskEvent) -> None:
            if not isinstance(event, TaskFinished):
                return
            # The ended row holds the timings, whichever path ended the task.
            row = rt.store.get(event.task_id)
            if row is not None:
                self.task_finished(engine, row)

        rt.bus.subscribe(on_event)

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class RuntimeCollector(Collector):
    """Gauges read at scrape time: the fleet's queue from the store (so any node shows it), the
    webhook outbox, the engine, and CUDA memory when torch is already in use here."""

    def __init__(self, rt: Runtime, metrics: Metrics | None = None) -> None:
        self.rt = rt
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        # Described lazily: a scrape-time collector must not query the store on register.
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("openedits_store_up", "1 when the task store answered this scrape.")
        try:
            families = list(self._store_families())
        except Exception:
            log.warning("metrics: the task store did not answer", exc_info=True)
            up.add_metric([], 0)
            families = []
        else:
            up.add_metric([], 1)
        yield up
        yield from families
        yield from self._engine_families()
        yield from _cuda_families()

    def _store_families(self) -> Iterator[Metric]:
        live = [TaskState.pending.value, TaskState.running.value]
        with self.rt.db.connect() as conn:
            counts: dict[str, int] = dict(conn.execute(
                select(tasks.c.state, func.count()).where(tasks.c.state.in_(live))
                .group_by(tasks.c.state)
            ).all())
            oldest = conn.execute(
                select(func.min(tasks.c.created_at)).where(
                    tasks.c.state == TaskState.pending.value)
            ).scalar_one_or_none()
            deliveries: dict[str, int] = dict(conn.execute(
                select(webhook_deliveries.c.state, func.count())
                .group_by(webhook_deliveries.c.state)
            ).all())
        queue = GaugeMetricFamily(
            "openedits_tasks", "Tasks pending or running in the whole store (every node).",
            labels=["state"])
        for state in live:
            queue.add_metric([state], float(counts.get(state, 0)))
        yield queue
        age = GaugeMetricFamily(
            "openedits_tasks_oldest_pending_age_seconds",
            "Seconds the oldest pending task has waited (0 when none waits).")
        age.add_metric([], max(0.0, self.rt.clock() - oldest) if oldest is not None else 0.0)
        yield age
        pending = GaugeMetricFamily(
            "openedits_webhook_pending", "Callbacks owed and not yet delivered (whole store).")
        pending.add_metric([], float(deliveries.get("pending", 0)))
        yield pending
        if self.metrics is None or not self.metrics.webhooks_hooked:
            # No per-attempt hook in this process: deliveries by how they ended, from the
            # outbox. Fleet-wide like openedits_tasks, and it drops when old rows are pruned.
            total = CounterMetricFamily(
                "openedits_webhook_deliveries",
                "Callback deliveries by outcome, from the outbox (whole store).",
                labels=["outcome"])
            for outcome in ("delivered", "failed"):
                total.add_metric([outcome], float(deliveries.get(outcome, 0)))
            yield total

    def _engine_families(self) -> Iterator[Metric]:
        info = self.rt.engine.info()
        family = GaugeMetricFamily(
            "openedits_engine_info", "The engine this process runs (always 1).",
            labels=["engine", "model", "device"])
        family.add_metric([info.name, info.model or "", info.device], 1)
        yield family
        loaded = GaugeMetricFamily(
            "openedits_engine_loaded", "1 when the engine's weights are in memory.")
        loaded.add_metric([], 1 if info.loaded else 0)
        yield loaded


def _cuda_families() -> Iterator[Metric]:
    """Device memory, only where torch is already imported and has touched CUDA: a scrape
    must never import torch (seconds, gigabytes) or create a CUDA context."""
    torch: Any = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return
        allocated = GaugeMetricFamily(
            "openedits_device_memory_allocated_bytes", "CUDA memory held by tensors.",
            labels=["device"])
        reserved = GaugeMetricFamily(
            "openedits_device_memory_reserved_bytes", "CUDA memory reserved by the allocator.",
            labels=["device"])
        total = GaugeMetricFamily(
            "openedits_device_memory_total_bytes", "The device's memory.", labels=["device"])
        for i in range(torch.cuda.device_count()):
            name = f"cuda:{i}"
            allocated.add_metric([name], float(torch.cuda.memory_allocated(i)))
            reserved.add_metric([name], float(torch.cuda.memory_reserved(i)))
            total.add_metric([name], float(torch.cuda.get_device_properties(i).total_memory))
    except Exception:
        log.warning("metrics: reading CUDA memory failed", exc_info=True)
        return
    yield from (allocated, reserved, total)


def serve_metrics(metrics: Metrics, port: int, host: str = "127.0.0.1") -> Callable[[], None]:
    """Serve `metrics` at http://host:port/metrics from a daemon thread (for worker processes,
    which serve no API); returns a function that stops it. Bind loopback unless the network
    in front of it restricts who may scrape: this endpoint has no token check."""
    server, thread = start_http_server(port, host, registry=metrics.registry)
    log.info("metrics on http://%s:%d/metrics", host, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop

