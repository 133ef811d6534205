"""create_app: the FastAPI application, wired from Settings (nothing happens at import time)."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text

from openedits import __version__
from openedits.api._errors import TraceMiddleware, install_error_handlers
from openedits.api._health import StoreProbe
from openedits.api._observe import ObserveMiddleware
from openedits.api.hosts import AllowedHostsMiddleware
from openedits.api.ratelimit import RateLimitMiddleware
from openedits.api.routes import edits, files, health, hosted, ops, tasks, web, webhooks
from openedits.api.security import SecurityHeadersMiddleware
from openedits.auth import Authenticator
from openedits.editing import EditService
from openedits.engines.base import Engine
from openedits.lifecycle import HasReadiness, Lifecycle
from openedits.metrics import Metrics
from openedits.runtime import Runtime
from openedits.settings import Settings
from openedits.webhooks.delivery import DeliveryLoop
from openedits.workers.dispatch import Dispatcher, InProcessDispatcher

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    runtime: Runtime | None = None,
    engine: Engine | None = None,
    dispatcher: Dispatcher | None = None,
) -> FastAPI:
    """Build the app. Tests pass a fake engine or dispatcher; `uvicorn --factory` passes nothing
    and Settings come from the environment."""
    settings = settings or Settings()
    rt = runtime or Runtime.build(settings, engine=engine)
    disp = dispatcher or _default_dispatcher(rt)
    metrics = Metrics()
    # Finishes are counted where tasks run: an API node whose bus relays its workers' events
    # would count each of them again (the workers export their own).
    metrics.watch(rt, count_finished=isinstance(disp, InProcessDispatcher))
    deliveries = DeliveryLoop.from_runtime(rt, on_outcome=metrics.hook_webhooks())
    rt.bus.subscribe(deliveries)  # a finished task wakes the loop: callbacks leave at once
    lifecycle = Lifecycle(settings.drain_seconds)
    warmup = _readiness(lifecycle, rt, runs_engine=isinstance(disp, InProcessDispatcher))
    if isinstance(disp, HasReadiness):
        lifecycle.add_check("broker", disp.ready)
    service = EditService(
        rt, disp, Authenticator(settings.bootstrap_tokens, rt.tokens), lifecycle=lifecycle
    )
    probe = StoreProbe(rt)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        info = rt.engine.info()
        log.info("openedits %s: engine %s on %s, store %s", __version__, info.name,
                 info.device, rt.db.dialect.name)
        lifecycle.start()
        disp.start()
        deliveries.start()
        await to_thread.run_sync(probe.start)
        if warmup is not None:
            threading.Thread(target=warmup, name="openedits-engine-load", daemon=True).start()
        try:
            yield
        finally:
            await to_thread.run_sync(probe.stop)
            # Served without `openedits serve` (plain uvicorn), no signal began the drain:
            # drain here, so running tasks go back to pending now rather than after their lease.
            # Joining threads blocks: off the event loop, so in-flight replies still go out.
            await to_thread.run_sync(lifecycle.drain, disp)
            await to_thread.run_sync(disp.stop)
            await to_thread.run_sync(deliveries.stop)
            if runtime is None:
                rt.db.dispose()

    app = FastAPI(
        title="openedits",
        version=__version__,
        summary="A self-hosted image-editing API that speaks the Midjourney Edits API contract.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.runtime = rt
    app.state.service = service
    app.state.dispatcher = disp
    app.state.deliveries = deliveries
    app.state.store_probe = probe
    app.state.lifecycle = lifecycle
    app.state.metrics = metrics
    install_error_handlers(app)
    # Outermost last: security headers on every reply, then the trace id, then the Host check.
    app.add_middleware(RateLimitMiddleware, settings=settings)
    # Inside TraceMiddleware, so access lines carry the trace id and a crash counts as a 500.
    app.add_middleware(ObserveMiddleware, metrics=metrics)
    app.add_middleware(AllowedHostsMiddleware, settings=settings)
    app.add_middleware(TraceMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    for module in (edits, tasks, webhooks, hosted, files, health, ops, web):
        app.include_router(module.router)
    app.mount("/web", StaticFiles(directory=web.WEB_DIR, check_dir=False), name="web")
    return app


def _readiness(
    lifecycle: Lifecycle, rt: Runtime, *, runs_engine: bool
) -> Callable[[], None] | None:
    """Register what readiness needs: the store always; the engine where this process runs
    it (a scale-out API node registers its broker instead). Returns what loads the engine's
    weights at start (in a thread), so a node is ready before its first edit, not after."""

    def store() -> str | None:
        with rt.db.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None

    lifecycle.add_check("store", store)
    if not runs_engine:
        return None
    failure: list[str] = []

    def engine() -> str | None:
        if failure:
            return failure[0]
        info = rt.engine.info()
        return None if info.loaded else f"engine {info.name} is loading its weights"

    def load() -> None:
        try:
            rt.engine.load(rt.settings.device)
        except Exception as exc:
            log.exception("loading the engine failed")
            failure.append(f"engine {rt.engine.name} failed to load: {exc}")

    lifecycle.add_check("engine", engine)
    return None if rt.engine.info().loaded else load


def _default_dispatcher(rt: Runtime) -> Dispatcher:
    """Celery workers when a broker is configured (this process is then an API node), else
    in-process worker threads."""
    if rt.settings.broker_url:
        from openedits.workers.celery_dispatch import CeleryDispatcher

        return CeleryDispatcher(rt)
    return InProcessDispatcher(rt)
