"""Observing requests: per-route HTTP metrics, one access line each, and Server-Timing."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openedits.metrics import PHASES, Metrics

__all__ = ["ObserveMiddleware", "server_timing"]

access_log = logging.getLogger("openedits.access")

# The method is the client's to choose: anything else is one label value, not one each.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _route(scope: Scope) -> str:
    """The matched route's template (`/files/{task_id}/{name}`), never the path itself, so a
    task id never becomes a label; `unmatched` for paths no route knows."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else "unmatched"


class ObserveMiddleware:
    """Times every HTTP request, counts it by route template, method and status, and writes
    one access line (method, path, status, duration_ms) with the request's trace id."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            seconds = time.perf_counter() - started
            method = scope.get("method", "GET")
            route = _route(scope)
            self.metrics.http_requests.labels(
                route, method if method in _METHODS else "other", str(status)
            ).inc()
            self.metrics.http_duration.labels(route).observe(seconds)
            client = scope.get("client")
            access_log.info(
                "%s %s %d %.1f ms", method, scope.get("path", ""), status, seconds * 1000,
                extra={
                    "method": method,
                    "path": scope.get("path", ""),
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "client": f"{client[0]}:{client[1]}" if client else None,
                    "trace_id": scope.get("state", {}).get("trace_id"),
                },
            )


def server_timing(timings: Mapping[str, object] | None) -> str | None:
    """The W3C Server-Timing header value for a task's timings (seconds per phase), in
    milliseconds: `queue;dur=3.1, inputs;dur=12.0, engine;dur=840.2, results;dur=20.5, ...`."""
    if not timings:
        return None
    parts = []
    for phase in PHASES:
        seconds = timings.get(phase)
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
            parts.append(f"{phase};dur={seconds * 1000:.1f}")
    return ", ".join(parts) or None
