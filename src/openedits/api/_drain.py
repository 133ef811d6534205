"""Serving with a graceful drain: SIGTERM/SIGINT drain the app's work before uvicorn stops."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from openedits.lifecycle import Lifecycle

__all__ = ["DrainingServer", "shutdown_timeout"]

log = logging.getLogger(__name__)

# Uvicorn's own graceful shutdown must outlast the drain, so replies to waiting callers (which
# come at the drain's end) still go out instead of being cut off.
_SHUTDOWN_MARGIN = 15.0


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM or SIGINT drains the app before stopping.

    While draining, the server keeps listening: /readyz answers 503 at once (a load balancer
    takes the node out), no task is claimed, running tasks get the grace period, and callers
    waiting on tasks get their result or a 503 envelope with the task id. Then uvicorn's normal
    shutdown runs. The signal is not re-raised afterwards, so the process exits 0. A second
    SIGINT stops at once (as uvicorn does).
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, dispatcher: Any) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.dispatcher = dispatcher
        self._draining: threading.Thread | None = None

    @classmethod
    def for_app(cls, app: FastAPI, config: uvicorn.Config) -> DrainingServer:
        """The server for an app built by create_app (its lifecycle and dispatcher)."""
        return cls(config, app.state.lifecycle, app.state.dispatcher)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler (main thread): start the drain, or force the exit on a repeat."""
        if self._draining is not None:
            if sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        log.info("received %s: draining", signal.Signals(sig).name)
        self._draining = threading.Thread(target=self._drain, name="openedits-drain",
                                          daemon=True)
        self._draining.start()

    def _drain(self) -> None:
        try:
            self.lifecycle.drain(self.dispatcher)
        finally:
            self.should_exit = True


def shutdown_timeout(lifecycle: Lifecycle) -> int:
    """uvicorn's `timeout_graceful_shutdown` for a drain of this length."""
    return int(lifecycle.grace_seconds + _SHUTDOWN_MARGIN)

