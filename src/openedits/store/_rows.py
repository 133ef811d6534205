"""The shapes of a task outside the database: what a submit gives the store (NewTask), and a
snapshot of its row (TaskRow)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openedits.schemas import TaskState

__all__ = ["NewTask", "TaskRow"]


@dataclass(frozen=True)
class NewTask:
    """What the API knows about a task when it accepts it."""

    id: str
    owner: str
    trace_id: str
    request: dict[str, Any]
    priority: int
    base_url: str
    callback_url: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None


@dataclass(frozen=True)
class TaskRow:
    """A snapshot of one task row."""

    id: str
    owner: str
    trace_id: str
    state: TaskState
    priority: int
    request: dict[str, Any]
    response: dict[str, Any] | None
    error_status: int | None
    progress: int
    base_url: str
    callback_url: str | None
    seeds: list[int] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    lease_owner: str | None
    lease_expires_at: float | None
    attempts: int
    cancel_requested: bool
    idempotency_key: str | None
    request_hash: str | None
    timings: dict[str, float] | None = None
    notes: list[str] | None = None

    @classmethod
    def from_mapping(cls, m: Any) -> TaskRow:
        """Build from a SQLAlchemy row mapping."""
        values = dict(m)
        values["state"] = TaskState(values["state"])
        return cls(**values)
