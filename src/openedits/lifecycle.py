"""Lifecycle: is this process ready for traffic, and its drain when it is told to stop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["Drainable", "HasReadiness", "Lifecycle", "ReadinessCheck"]

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], str | None]
"""Returns None when its part is ready, else a sentence saying what is not."""


class Drainable(Protocol):
    """What a drain needs of a dispatcher (the Dispatcher Protocol has it)."""

    def drain(self, grace_seconds: float) -> None:
        """Stop claiming; give running tasks `grace_seconds`, then release the rest."""
        ...


@runtime_checkable
class HasReadiness(Protocol):
    """A dispatcher whose readiness is its own (a broker-backed one: does the broker answer?).
    create_app adds its `ready` as the "broker" check."""

    def ready(self) -> str | None:
        """None when ready, else a sentence saying what is not (e.g. the broker is down)."""
        ...


class Lifecycle:
    """Readiness checks, and the drain: once `drain` begins, readiness fails at once, no new
    task is claimed here, running tasks get the grace period, and then `closed` is set so the
    requests still waiting on tasks answer (503 with the task id) instead of being cut off."""

    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.draining = threading.Event()
        self.closed = threading.Event()
        self._checks: dict[str, ReadinessCheck] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Serving (again): not draining (an app's lifespan may run more than once)."""
        with self._lock:
            self.draining.clear()
            self.closed.clear()

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        """Make readiness depend on `check` (e.g. "store", "engine", "broker")."""
        self._checks[name] = check

    def not_ready(self) -> dict[str, str]:
        """What is not ready, by part; empty when the process may take traffic."""
        problems: dict[str, str] = {}
        if self.draining.is_set():
            problems["process"] = "draining: the process is shutting down"
        for name, check in self._checks.items():
            try:
                problem = check()
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem is not None:
                problems[name] = problem
        return problems

    def drain(self, dispatcher: Drainable) -> None:
        """Drain once (later calls wait for the first): blocks up to the grace period plus the
        time releasing the leftovers takes."""
        with self._lock:
            if self.closed.is_set():
                return
            started = time.monotonic()
            self.draining.set()
            log.info("draining: no new tasks; running ones get %.0f s", self.grace_seconds)
            try:
                dispatcher.drain(self.grace_seconds)
            except Exception:
                log.exception("draining the dispatcher failed")
            finally:
                self.closed.set()
            log.info("drained in %.1f s", time.monotonic() - started)
