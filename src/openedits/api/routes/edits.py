"""POST /midjourney/edits: submit an edit, and reply sync, async, or as an NDJSON stream."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from openedits.api.deps import CallerDep, JsonBodyDep, RuntimeDep, ServiceDep, TraceIdDep
from openedits.schemas import EditAccepted, EditCreate, EditResult, ErrorBody, TaskState

__all__ = ["router"]

router = APIRouter(tags=["edits"])

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
