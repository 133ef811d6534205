"""Log lines that say which request and task they are about (trace_id, task_id)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["ContextFilter", "JsonFormatter", "bind", "configure_logging", "trace_id_var"]

trace_id_var: ContextVar[str | None] = ContextVar("openedits_trace_id", default=None)
task_id_var: ContextVar[str | None] = ContextVar("openedits_task_id", default=None)

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"


class ContextFilter(logging.Filter):
    """Stamps each record with the trace and task ids in scope (or given in `extra=`), and
    renders them as a `context` suffix, so grep by either id finds every line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "trace_id", None) is None:
            record.trace_id = trace_id_var.get()
        if getattr(record, "task_id", None) is None:
            record.task_id = task_id_var.get()
        parts = [f"{k}={getattr(record, k)}" for k in ("task_id", "trace_id")
                 if getattr(record, k, None)]
        record.context = (" [" + " ".join(parts) + "]") if parts else ""
        return True


@contextmanager
def bind(*, task_id: str | None = None, trace_id: str | None = None) -> Iterator[None]:
    """Within the block, every log line carries these ids (worker threads call this per task,
    since threads do not inherit the request's context)."""
    tokens = []
    if task_id is not None:
        tokens.append((task_id_var, task_id_var.set(task_id)))
    if trace_id is not None:
        tokens.append((trace_id_var, trace_id_var.set(trace_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


# Keys an access line (openedits.access) or a callback line adds to the JSON object.
_EXTRA_KEYS = ("method", "path", "status", "duration_ms", "client", "webhook_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log stores: time (UTC, ISO 8601), level, logger, message,
    trace_id, task_id; access lines add method, path, status, duration_ms and client; a
    traceback goes in `exc_info` as text, so a line never spans two lines."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": getattr(record, "trace_id", None),
            "task_id": getattr(record, "task_id", None),
        }
        for key in _EXTRA_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: Literal["text", "json"] = "text") -> None:
    """Root logging for the `openedits` command: one stderr handler that shows the ids, as
    readable text or as JSON lines. Uvicorn's loggers propagate here (serve passes it no
    logging config), so its lines come out in the same format."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # Whatever configured them before (an earlier uvicorn run in this process), they now
        # write through the root handler only.
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
