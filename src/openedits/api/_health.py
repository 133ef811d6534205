"""The store's health, checked on a thread of its own so /healthz never waits for the store.

A liveness probe must answer in milliseconds whatever the load: a probe with a 1 s timeout that
queues behind 200 submits for the thread pool or the SQLite write lock restarts a healthy server.
So /healthz reads a snapshot, and this probe refreshes it every `interval` seconds (a `SELECT 1`
and the queue's depth) on a dedicated daemon thread, outside the request thread pool. A snapshot
older than `stale_after` (the store hangs, or the probe died) reads as not ok.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy import text

from openedits.runtime import Runtime

__all__ = ["StoreHealth", "StoreProbe"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreHealth:
    """What the last store check found."""

    ok: bool
    active: int | None  # pending + running tasks, None when the check failed
    checked_at: float  # time.monotonic() of the check


class StoreProbe:
    """Keeps a fresh StoreHealth for the runtime's store."""

    def __init__(self, rt: Runtime, *, interval: float = 2.0, stale_after: float = 30.0) -> None:
        self.rt = rt
        self.interval = interval
        self.stale_after = stale_after
        self._health = StoreHealth(ok=False, active=None, checked_at=-float("inf"))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> StoreHealth:
        """Check the store now (blocking) and keep the result."""
        try:
            with self.rt.db.connect() as conn:
                conn.execute(text("SELECT 1"))
            health = StoreHealth(True, self.rt.store.count_active(), time.monotonic())
        except Exception:
            log.warning("store health check failed", exc_info=True)
            health = StoreHealth(False, None, time.monotonic())
        self._health = health
        return health

    def current(self) -> StoreHealth:
        """The latest result, without blocking; not ok once it is older than `stale_after`."""
        health = self._health
        if time.monotonic() - health.checked_at > self.stale_after:
            return StoreHealth(False, None, health.checked_at)
        return health

    def start(self) -> None:
        """Check once, then keep checking on a daemon thread."""
        self.check()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="store-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (waits at most one check)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()
