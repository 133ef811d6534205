"""Wire models of CONTRACT.md: the bodies clients send and the bodies openedits returns."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

__all__ = [
    "EditAccepted",
    "EditCreate",
    "EditResult",
    "ErrorBody",
    "ErrorDetail",
    "TaskPublic",
    "TaskState",
    "TasksBatch",
    "TasksRequest",
]


class TaskState(StrEnum):
    """Where a task is in its life; the terminal ones never change again."""

    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    def is_terminal(self) -> bool:
        """True for succeeded, failed and cancelled."""
        return self in (TaskState.succeeded, TaskState.failed, TaskState.cancelled)


class EditCreate(BaseModel):
    """The body of POST /midjourney/edits. Unknown keys are kept (and ignored)."""

    model_config = ConfigDict(extra="allow")

    # The rules below are stated for the OpenAPI document (json_schema_extra) and enforced in
    # EditService.parse, whose refusals name the field, the value and the rule.
    image_url: StrictStr = Field(
        description="An http(s) URL or a data:image/...;base64, URI.",
        json_schema_extra={"pattern": "^(https?://|data:)"},
    )
    prompt: StrictStr = Field(
        description="What the edited image should show; 1 to 4,000 chars.",
        json_schema_extra={"minLength": 1, "maxLength": 4000},
    )
    action: StrictStr = Field(
        default="generate",
        description="Only `generate` is served.",
        json_schema_extra={"enum": ["generate"]},
    )
    mask: StrictStr | None = Field(
        default=None,
        description="Region to regenerate: bare base64, a data: URI or an http(s) URL. "
        "White = regenerate, black = keep.",
    )
    mode: Literal["fast", "relax", "turbo"] = "fast"
    split_images: StrictBool = False
    callback_url: StrictStr | None = None
    async_: StrictBool = Field(default=False, alias="async")
    seed: StrictInt | None = Field(
        default=None,
        ge=0,
        le=2**32 - 4,
        description="(openedits) base seed; variant i uses seed + i.",
    )
    output_format: Literal["png", "webp", "jpeg"] = Field(
        default="png",
        description="(openedits) the result files' format: png (lossless), webp or jpeg.",
    )
    output_quality: StrictInt | None = Field(
        default=None,
        ge=1,
        le=100,
        description="(openedits) webp and jpeg quality, 1 to 100 (default 90).",
    )


class ErrorDetail(BaseModel):
    """The `error` object of every failure."""

    code: str
    message: str


class ErrorBody(BaseModel):
    """The envelope of every error response."""

    success: Literal[False] = False
    error: ErrorDetail
    trace_id: str


class EditAccepted(BaseModel):
    """The reply to an async or callback submit."""

    success: Literal[True] = True
    task_id: str
    trace_id: str


class EditResult(BaseModel):
    """A finished edit: the sync reply, the callback body, the task's `response`."""

    success: Literal[True] = True
    task_id: str
    image_id: str
    image_url: str
    image_width: int
    image_height: int
    raw_image_url: str
    raw_image_width: int
    raw_image_height: int
    sub_image_urls: list[str] = Field(default_factory=list)
    progress: int = 100
    actions: list[str] = Field(default_factory=list)


class TaskPublic(BaseModel):
    """One task record as /midjourney/tasks returns it."""

    model_config = ConfigDict(extra="allow")

    id: str
    type: Literal["edits"] = "edits"
    trace_id: str
    request: dict[str, Any]
    response: dict[str, Any] | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    elapsed: float | None = None
    state: TaskState


class TasksRequest(BaseModel):
    """The body of POST /midjourney/tasks."""

    model_config = ConfigDict(extra="allow")

    action: StrictStr = Field(
        default="retrieve", json_schema_extra={"enum": ["retrieve", "retrieve_batch", "cancel"]}
    )
    id: StrictStr | None = None
    trace_id: StrictStr | None = None
    ids: list[StrictStr] | None = Field(default=None, max_length=100)
    trace_ids: list[StrictStr] | None = Field(default=None, max_length=100)
    offset: StrictInt = Field(default=0, ge=0)
    limit: StrictInt = Field(default=12, ge=1, le=100)


class TasksBatch(BaseModel):
    """The reply to retrieve_batch."""

    items: list[TaskPublic]
    count: int
