"""POST /midjourney/edits: submit an edit, and reply sync, async, or as an NDJSON stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from openedits.api.deps import CallerDep, JsonBodyDep, RuntimeDep, ServiceDep, TraceIdDep
from openedits.errors import EngineFailed, SyncTimeout
from openedits.records import failure_body
from openedits.runtime import Runtime
from openedits.schemas import EditAccepted, EditCreate, EditResult, ErrorBody, TaskState
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
        429: "too_many_requests (with Retry-After)",
        500: "api_error",
        504: "timeout (the task goes on)",
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
    body: JsonBodyDep,
    caller: CallerDep,
    service: ServiceDep,
    rt: RuntimeDep,
    trace_id: TraceIdDep,
    idempotency_key: str | None = Header(default=None),
) -> Any:
    """Edit an image from a prompt: four variants as a 2x2 grid (and singly with split_images)."""
    row, edit = service.submit(
        body,
        caller,
        trace_id=trace_id,
        base_url=str(request.base_url),
        idempotency_key=idempotency_key,
    )
    if NDJSON in request.headers.get("accept", "").lower():
        # Asking for a stream beats `async` and `callback_url`: the caller said how it waits.
        deliveries: DeliveryLoop = request.app.state.deliveries
        return StreamingResponse(
            _stream(rt, deliveries, row.id, rt.settings.sync_timeout_seconds),
            media_type=NDJSON,
        )
    if edit.async_ or edit.callback_url is not None:
        return EditAccepted(task_id=row.id, trace_id=row.trace_id).model_dump()
    row = await service.wait(row.id, rt.settings.sync_timeout_seconds)
    if row.state is TaskState.succeeded and row.response is not None:
        return row.response
    response = dict(row.response or {})
    # The error reply is the contract's envelope; the task id rides along as an extra key.
    return JSONResponse(
        {
            "success": False,
            "error": response.get("error", {"code": "api_error", "message": "task failed"}),
            "trace_id": trace_id,
            "task_id": row.id,
        },
        status_code=row.error_status or 500,
    )


def _line(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


async def _stream(
    rt: Runtime, deliveries: DeliveryLoop, task_id: str, timeout: float
) -> AsyncIterator[bytes]:
    """One result body per progress change, then the final result or failure body.

    Events wake the stream at once; each wake re-reads the store (which also covers events
    missed before the watch began, and workers in other processes). With a callback_url, each
    progress body is also POSTed there, best effort; the final one goes through the outbox.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = -1
    try:
        with rt.bus.watch(task_id) as watch:
            while True:
                row = await to_thread.run_sync(rt.store.get, task_id)
                if row is None:
                    yield _line(failure_body(task_id, "", EngineFailed(f"task {task_id} vanished")))
                    return
                if row.state.is_terminal():
                    yield _line(row.response or failure_body(
                        task_id, row.trace_id, EngineFailed("the task ended without a result")))
                    return
                if row.progress > last:
                    last = row.progress
                    # `success: true` with progress < 100: the hosted clients' "running".
                    body = {"success": True, "task_id": task_id, "progress": last}
                    yield _line(body)
                    if row.callback_url:
                        deliveries.post_progress(task_id, row.callback_url, body)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    error = SyncTimeout(
                        f"task {task_id} did not finish within {timeout:.0f} s; it goes on: "
                        "poll POST /midjourney/tasks with this id"
                    )
                    yield _line(failure_body(task_id, row.trace_id, error))
                    return
                await watch.next(min(remaining, 1.0))
    finally:
        deliveries.forget_progress(task_id)
