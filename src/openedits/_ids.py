"""Identifiers: task UUIDs, trace ids and time-ordered 64-bit image ids."""

from __future__ import annotations

import secrets
import threading
import time
import uuid

__all__ = ["new_image_id", "new_task_id", "new_trace_id"]

# A Snowflake-style layout, as the hosted service's image ids are: 42 bits of milliseconds
# since 2015-01-01, then 22 bits that are random per process plus a counter, so ids from one
# process are strictly increasing and ids from several processes rarely collide.
_EPOCH_MS = 1_420_070_400_000
_lock = threading.Lock()
_last_ms = 0
_sequence = 0
_node = secrets.randbits(10)


def new_task_id() -> str:
    """A fresh task id (UUID4 text)."""
    return str(uuid.uuid4())


def new_trace_id() -> str:
    """A fresh trace id (UUID4 text)."""
    return str(uuid.uuid4())


def new_image_id() -> str:
    """A time-ordered 64-bit id, as a string of digits."""
    global _last_ms, _sequence
    with _lock:
        now = int(time.time() * 1000) - _EPOCH_MS
        if now <= _last_ms:
            _sequence += 1
            if _sequence >= 4096:
                _last_ms += 1
                _sequence = 0
            now = _last_ms
        else:
            _sequence = 0
        _last_ms = now
        return str((now << 22) | (_node << 12) | _sequence)
