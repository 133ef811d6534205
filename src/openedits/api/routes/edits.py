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
from openedits.workers.events import TaskEvent, TaskProgress

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
    # The caller before the body: a bad token is refused before any body is read.
    caller: CallerDep,
    body: JsonBodyDep,
    service: ServiceDep,
    rt: RuntimeDep,
    trace_id: TraceIdDep,
    idempotency_key: str | None = Header(default=None),
) -> Any:
    """Edit an image from a prompt: four variants as a 2x2 grid (and singly with split_images)."""
    # Submitting writes to the store and may resolve a callback host: off the event loop.
    row, edit = await to_thread.run_sync(
        lambda: service.submit(
            body,
            caller,
            trace_id=trace_id,
            base_url=str(request.base_url),
            idempotency_key=idempotency_key,
        )
    )
    if NDJSON in request.headers.get("accept", "").lower():
        # Asking for a stream beats `async` and `callback_url`: the caller said how it waits.
        deliveries: DeliveryLoop = request.app.state.deliveries
        return StreamingResponse(
            _stream(rt, deliveries, row.id, row.trace_id, rt.settings.sync_timeout_seconds),
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
    rt: Runtime, deliveries: DeliveryLoop, task_id: str, trace_id: str, timeout: float
) -> AsyncIterator[bytes]:
    """One result body per progress change, then the final result or failure body.

    Events wake the stream at once; each wake re-reads the store (which also covers events
    missed before the watch began, and workers in other processes). With a callback_url, each
    progress body is also POSTed there, best effort; the final one goes through the outbox.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = -1

    def progressed(progress: int, callback_url: str | None) -> bytes | None:
        nonlocal last
        if progress <= last:
            return None
        last = progress
        # No `success` key while running, as in the task record: a receiver that trusts
        # `success: true` must never take a progress body for the finished edit.
        body = {"task_id": task_id, "progress": progress}
        if callback_url:
            deliveries.post_progress(task_id, callback_url, body)
        return _line(body)

    try:
        with rt.bus.watch(task_id) as watch:
            event: TaskEvent | None = None
            callback_url: str | None = None
            while True:
                # Progress events carry their value, so they need no store read; anything
                # else (start, finish, a quiet second) re-reads the row, which also covers
                # events missed before the watch began and workers in other processes.
                if isinstance(event, TaskProgress):
                    line = progressed(event.progress, callback_url)
                else:
                    row = await to_thread.run_sync(rt.store.get, task_id)
                    if row is None:
                        vanished = EngineFailed(f"task {task_id} vanished")
                        yield _line(failure_body(task_id, trace_id, vanished))
                        return
                    if row.state.is_terminal():
                        yield _line(row.response or failure_body(
                            task_id, row.trace_id, EngineFailed("the task ended without a result")))
                        return
                    callback_url = row.callback_url
                    line = progressed(row.progress, callback_url)
                if line is not None:
                    yield line
                remaining = deadline - loop.time()
                if remaining <= 0:
                    error = SyncTimeout(
                        f"task {task_id} did not finish within {timeout:.0f} s; it goes on: "
                        "poll POST /midjourney/tasks with this id"
                    )
                    yield _line(failure_body(task_id, trace_id, error))
                    return
                event = await watch.next(min(remaining, 1.0))
    finally:
        deliveries.forget_progress(task_id)
