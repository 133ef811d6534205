"""One renderer for every error: the contract's envelope, from any layer, with the trace id."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openedits._ids import new_trace_id
from openedits._logging import trace_id_var
from openedits.errors import (
    InvalidInput,
    NotFound,
    OpenEditsError,
    describe_value,
    validation_message,
)
from openedits.records import envelope

__all__ = ["TraceMiddleware", "envelope", "install_error_handlers"]

log = logging.getLogger("openedits.api")

def _trace_id(request: Request) -> str:
    return getattr(request.state, "trace_id", None) or new_trace_id()


def _flat_routes(routes: list[Any]) -> Iterator[Any]:
    # FastAPI >= 0.16x keeps included routers whole (`original_router`) instead of copying
    # their routes; openedits includes them without a prefix, so their paths match as they are.
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flat_routes(inner.routes)
        else:
            yield route


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette's Allow names one route's)."""
    methods: set[str] = set()
    for route in _flat_routes(request.app.routes):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return ", ".join(sorted(methods, key=lambda m: (order.index(m) if m in order else 99, m)))


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that render every exception as the envelope."""

    @app.exception_handler(OpenEditsError)
    async def _domain(request: Request, exc: OpenEditsError) -> JSONResponse:
        trace_id = _trace_id(request)
        return JSONResponse(
            envelope(exc.code, exc.message, trace_id), exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = InvalidInput(validation_message(list(exc.errors())))
        return JSONResponse(envelope(err.code, err.message, _trace_id(request)), 400)

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, exc: ValidationError) -> JSONResponse:
        err = InvalidInput(validation_message(list(exc.errors())))
        return JSONResponse(envelope(err.code, err.message, _trace_id(request)), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        trace_id = _trace_id(request)
        path = request.url.path
        if exc.status_code == 404:
            err: OpenEditsError = NotFound(
                f"no such path {describe_value(path)}; openedits serves POST /midjourney/edits, "
                "POST /midjourney/tasks, GET /files/<task_id>/<name> and GET /healthz"
            )
            return JSONResponse(envelope(err.code, err.message, trace_id), 404)
        if exc.status_code == 405:
            # Starlette spells it "Allow"; look it up in any case so the message says what is.
            allowed = _allowed_methods(request) or next(
                (v for k, v in (exc.headers or {}).items() if k.lower() == "allow"), ""
            )
            message = f"{request.method} is not allowed on {path}; use {allowed or 'POST'}"
            return JSONResponse(
                envelope("method_not_allowed", message, trace_id),
                405,
                headers={"allow": allowed} if allowed else None,
            )
        code = "bad_request" if exc.status_code < 500 else "api_error"
        return JSONResponse(envelope(code, str(exc.detail), trace_id), exc.status_code)


class TraceMiddleware:
    """Gives every request a trace id (request.state.trace_id and the x-trace-id header) and
    turns any exception that escapes the app into the 500 envelope naming that trace id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trace_id = new_trace_id()
        scope.setdefault("state", {})["trace_id"] = trace_id
        token = trace_id_var.set(trace_id)
        started = False

        async def send_with_trace(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers.append((b"x-trace-id", trace_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_trace)
        except (ClientDisconnect, ConnectionError):
            # The client hung up (mid-body, or while its reply was being sent): nobody is left
            # to answer, and it is not the server's fault, so no traceback and no ERROR line.
            log.info("client hung up during %s %s", scope.get("method"), scope.get("path"))
        except Exception:
            log.exception("unhandled error", extra={"trace_id": trace_id})
            if started:
                return
            body = json.dumps(
                envelope(
                    "api_error",
                    f"internal error; quote trace_id {trace_id} when reporting it",
                    trace_id,
                )
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"x-trace-id", trace_id.encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            trace_id_var.reset(token)
