"""Request dependencies as Annotated aliases: the runtime, the service, the caller, the trace id."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, Request

from openedits.auth import Caller
from openedits.editing import EditService
from openedits.errors import InvalidInput, PayloadTooLarge, describe_value
from openedits.runtime import Runtime

__all__ = [
    "CallerDep",
    "JsonBodyDep",
    "RuntimeDep",
    "ServiceDep",
    "TraceIdDep",
    "read_json_object",
]


def get_runtime(request: Request) -> Runtime:
    """The process's Runtime."""
    rt: Runtime = request.app.state.runtime
    return rt


def get_service(request: Request) -> EditService:
    """The edit service."""
    service: EditService = request.app.state.service
    return service


def get_trace_id(request: Request) -> str:
    """This request's trace id (set by TraceMiddleware)."""
    return str(request.state.trace_id)


def get_caller(request: Request) -> Caller:
    """Authenticate the bearer token (401 invalid_token when missing or unknown)."""
    service: EditService = request.app.state.service
    return service.authenticator.authenticate(request.headers.get("authorization"))


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, size-capped; `null` values dropped (they count as absent)."""
    limit = get_runtime(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"the request body is {int(declared):,} bytes; at most {limit:,} are accepted "
            "(send large images by URL instead of inline)"
        )
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise PayloadTooLarge(f"the request body is over {limit:,} bytes")
    if not chunks.strip():
        raise InvalidInput("the body is empty; send a JSON object such as {\"image_url\": …}")
    try:
        body = json.loads(chunks)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(
            f"the body is not valid JSON ({exc}); send a JSON object with content-type "
            "application/json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidInput(f"the body must be a JSON object, got {describe_value(body)}")
    return {k: v for k, v in body.items() if v is not None}


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ServiceDep = Annotated[EditService, Depends(get_service)]
TraceIdDep = Annotated[str, Depends(get_trace_id)]
CallerDep = Annotated[Caller, Depends(get_caller)]
JsonBodyDep = Annotated[dict[str, Any], Depends(read_json_object)]
