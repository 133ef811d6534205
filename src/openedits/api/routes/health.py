"""GET /healthz: is the server up, which engine, which store."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import text

from openedits import __version__
from openedits.api.deps import RuntimeDep

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(request: Request, rt: RuntimeDep) -> dict[str, Any]:
    """Liveness and what this server runs: engine, model, device, store, queue depth."""
    state = request.app.state
    dispatcher = getattr(state.dispatcher, "name", type(state.dispatcher).__name__)
    info = rt.engine.info()
    store_ok = True
    try:
        with rt.db.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        store_ok = False
    return {
        "status": "ok" if store_ok else "degraded",
        "version": __version__,
        "engine": {
            "name": info.name,
            "model": info.model,
            "device": info.device,
            "loaded": info.loaded,
            **info.extra,
        },
        "store": {"backend": rt.db.dialect.name, "ok": store_ok},
        "queue": {"active": rt.store.count_active() if store_ok else None},
        "dispatcher": dispatcher,
    }
