"""GET /healthz: is the server up, which engine, which store."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from openedits import __version__
from openedits.api._health import StoreProbe
from openedits.runtime import Runtime

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.head("/healthz", include_in_schema=False)
@router.get("/healthz")
async def healthz(request: Request) -> dict[str, Any]:
    """Liveness and what this server runs: engine, model, device, store, queue depth.

    Runs on the event loop and touches neither the store nor the thread pool (the store's
    state is a snapshot refreshed in the background), so it answers at once under any load.
    """
    state = request.app.state
    # No dependencies: FastAPI runs a sync one (RuntimeDep's) in the thread pool, which is
    # exactly what a burst keeps busy.
    rt: Runtime = state.runtime
    dispatcher = getattr(state.dispatcher, "name", type(state.dispatcher).__name__)
    probe: StoreProbe = state.store_probe
    store = probe.current()
    info = rt.engine.info()
    return {
        "status": "ok" if store.ok else "degraded",
        "version": __version__,
        "engine": {
            "name": info.name,
            "model": info.model,
            "device": info.device,
            "loaded": info.loaded,
            **info.extra,
        },
        "store": {"backend": rt.db.dialect.name, "ok": store.ok},
        "queue": {"active": store.active},
        "dispatcher": dispatcher,
    }
