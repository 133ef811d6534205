"""Log lines that say which request and task they are about (trace_id, task_id)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["ContextFilter", "bind", "configure_logging", "trace_id_var"]

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


def configure_logging(level: str) -> None:
    """Root logging for the `openedits` command: one stderr handler that shows the ids."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
