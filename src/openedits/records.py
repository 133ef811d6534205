"""How a task looks on the wire: its record for /midjourney/tasks and its failure body."""

from __future__ import annotations

from typing import Any

from openedits.errors import OpenEditsError
from openedits.schemas import TaskState
from openedits.store.tasks import TaskRow

__all__ = ["envelope", "failure_body", "task_record"]


def envelope(code: str, message: str, trace_id: str) -> dict[str, Any]:
    """The error body of CONTRACT.md, for every error from every layer."""
    return {"success": False, "error": {"code": code, "message": message}, "trace_id": trace_id}


def failure_body(task_id: str, trace_id: str, error: OpenEditsError) -> dict[str, Any]:
    """The body of a failed or cancelled task (callbacks, stream lines, records): the
    envelope, with the task's id."""
    return {**envelope(error.code, error.message, trace_id), "task_id": task_id}


def task_record(row: TaskRow) -> dict[str, Any]:
    """The task record of CONTRACT.md.

    `response` is absent while pending, `{"progress": n, ...}` while running, and the final body
    once ended; ended records repeat `success` and `image_url` or `error` at the top level
    because the official command-line client's `wait` looks there.
    """
    record: dict[str, Any] = {
        "id": row.id,
        "type": "edits",
        "trace_id": row.trace_id,
        "request": row.request,
        "created_at": row.created_at,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "elapsed": (
            round(row.finished_at - row.started_at, 3)
            if row.finished_at is not None and row.started_at is not None
            else None
        ),
        "state": row.state.value,
    }
    if row.seeds is not None:
        record["seeds"] = row.seeds
    if row.timings is not None:
        # Seconds per phase (queue, inputs, engine, results, total): where the time went.
        record["timings"] = row.timings
    if row.state is TaskState.running:
        # No `success` key while running: hosted clients read `success: true` as done.
        record["response"] = {"task_id": row.id, "progress": row.progress}
    elif row.state.is_terminal() and row.response is not None:
        response = dict(row.response)
        record["response"] = response
        record["success"] = bool(response.get("success"))
        if response.get("success"):
            record["image_url"] = response.get("image_url")
        else:
            record["error"] = response.get("error")
    return record
