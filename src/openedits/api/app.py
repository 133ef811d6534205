"""create_app: the FastAPI application, wired from Settings (nothing happens at import time)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from openedits import __version__
from openedits.api._errors import TraceMiddleware, install_error_handlers
from openedits.api.routes import edits, files, health, hosted, tasks, web, webhooks
from openedits.auth import Authenticator
from openedits.editing import EditService
from openedits.engines.base import Engine
from openedits.ratelimit import RateLimitMiddleware
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
    deliveries = DeliveryLoop.from_runtime(rt)
    rt.bus.subscribe(deliveries)  # a finished task wakes the loop: callbacks leave at once
    service = EditService(rt, disp, Authenticator(settings.bootstrap_tokens, rt.tokens))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        info = rt.engine.info()
        log.info("openedits %s: engine %s on %s, store %s", __version__, info.name,
                 info.device, rt.db.dialect.name)
        disp.start()
        deliveries.start()
        try:
            yield
        finally:
            # Joining threads blocks: off the event loop, so in-flight replies still go out.
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
    install_error_handlers(app)
    app.add_middleware(RateLimitMiddleware, settings=settings)
    app.add_middleware(TraceMiddleware)
    for module in (edits, tasks, webhooks, hosted, files, health, web):
        app.include_router(module.router)
    app.mount("/web", StaticFiles(directory=web.WEB_DIR, check_dir=False), name="web")
    return app


def _default_dispatcher(rt: Runtime) -> Dispatcher:
    """Celery workers when a broker is configured (this process is then an API node), else
    in-process worker threads."""
    if rt.settings.broker_url:
        from openedits.workers.celery_dispatch import CeleryDispatcher

        return CeleryDispatcher(rt)
    return InProcessDispatcher(rt)
