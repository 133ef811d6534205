"""POST /midjourney/tasks: retrieve, retrieve_batch and cancel."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from openedits.api.deps import CallerDep, JsonBodyDep, ServiceDep
from openedits.errors import NotImplementedOnServer, describe_value
from openedits.schemas import TaskPublic, TasksBatch, TasksRequest

__all__ = ["router"]

router = APIRouter(tags=["tasks"])


@router.post(
    "/midjourney/tasks",
    response_model=TaskPublic | TasksBatch | dict[str, Any],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": TasksRequest.model_json_schema()}},
        }
    },
)
def tasks(caller: CallerDep, body: JsonBodyDep, service: ServiceDep) -> Any:
    """Read tasks (`retrieve`, `retrieve_batch`) or stop one (`cancel`).

    A plain `def`: FastAPI runs it in its threadpool, so the store's queries never block the
    event loop that holds sync callers and streams."""
    request = TasksRequest.model_validate(body)
    if request.action == "retrieve":
        return service.retrieve(caller, request)
    if request.action == "retrieve_batch":
        return service.retrieve_batch(caller, request)
    if request.action == "cancel":
        return service.cancel(caller, request)
    raise NotImplementedOnServer(
        f"action {describe_value(request.action)} is not implemented; "
        "POST /midjourney/tasks serves retrieve, retrieve_batch and cancel"
    )
