"""GET /metrics (Prometheus) and GET /readyz (may a load balancer send traffic here?)."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from openedits.api.deps import TraceIdDep
from openedits.errors import TokenInvalid, TokenMismatched
from openedits.lifecycle import Lifecycle
from openedits.metrics import CONTENT_TYPE, Metrics
from openedits.records import envelope
from openedits.settings import Settings

__all__ = ["router"]

router = APIRouter(tags=["operations"])


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _authorize_scrape(request: Request) -> None:
    """OPENEDITS_METRICS_TOKEN, or an admin token, or (with no metrics token set) a loopback
    client. Behind a proxy the client is the forwarded address (OPENEDITS_FORWARDED_ALLOW_IPS),
    so a proxied scrape from elsewhere needs a token too."""
    settings: Settings = request.app.state.settings
    header = request.headers.get("authorization")
    token = settings.metrics_token
    if header is None:
        if token is None and _is_loopback(request.client.host if request.client else None):
            return
        raise TokenInvalid(
            "GET /metrics needs `authorization: Bearer <OPENEDITS_METRICS_TOKEN>` or an admin "
            "token" + ("" if token else " when scraped from a non-loopback address")
        )
    if token is not None and hmac.compare_digest(header.encode(), f"Bearer {token}".encode()):
        return
    caller = request.app.state.service.authenticator.authenticate(header)
    if not caller.is_admin:
        raise TokenMismatched(
            "GET /metrics needs an admin-scoped token or OPENEDITS_METRICS_TOKEN; this token "
            "has the scopes " + ", ".join(sorted(caller.scopes))
        )


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text format: tasks, phases, HTTP, webhooks, engine, process."""
    _authorize_scrape(request)
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)


@router.head("/readyz", include_in_schema=False, response_model=None)
@router.get("/readyz", response_model=None)
def readyz(request: Request, trace_id: TraceIdDep) -> dict[str, Any] | JSONResponse:
    """200 when the store answers, the engine (or broker) is ready and the process is not
    draining; otherwise 503 with the envelope and `not_ready` naming each part that is not."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    problems = lifecycle.not_ready()
    if not problems:
        return {"status": "ready"}
    message = "not ready: " + "; ".join(f"{part}: {why}" for part, why in problems.items())
    return JSONResponse(
        {**envelope("unavailable", message, trace_id), "not_ready": problems},
        status_code=503,
        headers={"Retry-After": "5"},
    )
