"""POST /midjourney/edits: submit an edit, and reply sync, async, or as an NDJSON stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from openedits.api._errors import envelope
from openedits.api._observe import server_timing
from openedits.api.deps import (
    CallerDep,
    RuntimeDep,
    ServiceDep,
    TraceIdDep,
    get_body_budget,
    parse_json_object,
    read_json_bytes,
)
from openedits.auth import Caller
from openedits.editing import EditService
from openedits.errors import EngineFailed, OpenEditsError
from openedits.records import failure_body
from openedits.schemas import EditAccepted, EditCreate, EditResult, ErrorBody, TaskState
from openedits.store.tasks import TaskRow
from openedits.webhooks.delivery import DeliveryLoop

__all__ = ["router"]

router = APIRouter(tags=["edits"])

NDJSON = "application/x-ndjson"

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "bad_request, token_mismatched or api_not_implemented",
        401: "invalid_token",
        403: "forbidden (moderation)",
        413: "payload_too_large",
        415: "unsupported_media_type (a content-encoding other than gzip or deflate)",
        429: "too_many_requests (with Retry-After)",
        500: "api_error",
        503: "server_busy: too many bodies in flight or the store is busy (with Retry-After)",
        504: "timeout (the task goes on; the body names its task_id)",
    }.items()
}


@router.post(
    "/midjourney/edits",
    response_model=EditResult | EditAccepted,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": EditCreate.model_json_schema()}},
        }
    },
)
async def create_edit(
    request: Request,
    response: Response,
    # The caller before the body: a bad token is refused before any body is read.
    caller: CallerDep,
    service: ServiceDep,
    rt: RuntimeDep,
    trace_id: TraceIdDep,
    idempotency_key: str | None = Header(default=None),
) -> Any:
    """Edit an image from a prompt: four variants as a 2x2 grid (and singly with split_images)."""
    # The body's room in the budget is held until the task is stored, then given back: a
    # sync caller waiting for its edit holds no megabytes meanwhile.
    async with get_body_budget(request).hold() as hold:
        raw = await read_json_bytes(request, hold)
        # Parsing, checking and storing take CPU time and write to the store: off the event
        # loop, in one thread hop.
        row, edit = await to_thread.run_sync(
            partial(
                _submit,
                service,
                raw,
                caller,
                trace_id=trace_id,
                base_url=str(request.base_url),
                idempotency_key=idempotency_key,
            )
        )
        del raw
    if row.trace_id == trace_id:  # a new task, not an idempotent replay of an earlier one
        request.app.state.metrics.task_submitted(rt.engine.name, edit.mode)
    # Every Accept field counts: a client may send the header more than once, which HTTP
    # reads as one comma-joined list (RFC 9110, 5.3).
    if any(NDJSON in value.lower() for value in request.headers.getlist("accept")):
        # Asking for a stream beats `async` and `callback_url`: the caller said how it waits.
        deliveries: DeliveryLoop = request.app.state.deliveries
        return StreamingResponse(
            _stream(service, deliveries, row, rt.settings.sync_timeout_seconds),
            media_type=NDJSON,
        )
    if edit.async_ or edit.callback_url is not None:
        return EditAccepted(task_id=row.id, trace_id=row.trace_id).model_dump()
    try:
        ended = await service.wait(
            row.id, rt.settings.sync_timeout_seconds, is_gone=request.is_disconnected
        )
    except OpenEditsError as exc:
        # A sync timeout (the task goes on) or a vanished task: the envelope, with the task
        # id, like every other error of a sync call that has a task.
        return JSONResponse(
            {**envelope(exc.code, exc.message, trace_id), "task_id": row.id},
            status_code=exc.status_code,
            headers=exc.headers or None,
        )
    if ended is None:
        # The client hung up; the task goes on and stays retrievable. Nobody reads this.
        return Response(status_code=499)
    timing = server_timing(ended.timings)
    headers = {"server-timing": timing} if timing else None
    if headers:
        response.headers.update(headers)
    if ended.state is TaskState.succeeded and ended.response is not None:
        return ended.response
    error = (ended.response or {}).get("error") or {"code": "api_error", "message": "failed"}
    # The error reply is the contract's envelope; the task id rides along as an extra key.
    return JSONResponse(
        {**envelope(error["code"], error["message"], trace_id), "task_id": ended.id},
        status_code=ended.error_status or 500,
        headers=headers,
    )


def _submit(
    service: EditService, raw: bytes, caller: Caller, **kwargs: Any
) -> tuple[TaskRow, EditCreate]:
    return service.submit(parse_json_object(raw), caller, **kwargs)


def _line(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


async def _stream(
    service: EditService, deliveries: DeliveryLoop, row: TaskRow, timeout: float
) -> AsyncIterator[bytes]:
    """One body per progress change, then the final result or failure body. With a
    callback_url, each progress body is also POSTed there, best effort; the final one goes
    through the outbox."""
    try:
        async for item in service.follow(row.id, timeout):
            if isinstance(item, TaskRow):
                yield _line(item.response or failure_body(
                    row.id, row.trace_id, EngineFailed("the task ended without a result")))
                return
            # No `success` key while running, as in the task record: a receiver that trusts
            # `success: true` must never take a progress body for the finished edit.
            body = {"task_id": row.id, "progress": item}
            yield _line(body)
            if row.callback_url:
                deliveries.post_progress(row.id, row.callback_url, body)
    except OpenEditsError as exc:
        yield _line(failure_body(row.id, row.trace_id, exc))
    finally:
        deliveries.forget_progress(row.id)
