"""Process memory: keep glibc's allocator from growing a server's RSS by fragmentation."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["tune_malloc"]

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Buffers from this size up get their own mapping, returned to the system when freed: image
# buffers (a 512 px RGB image is 768 KiB) and request bodies, which come and go per edit.
_MMAP_THRESHOLD = 256 * 1024


def tune_malloc(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas and fix its mmap threshold for the rest of the process's life;
    True when applied.

    With glibc's defaults, a server whose many threads (request pool, workers, encoders) each
    allocate and free megabyte image buffers keeps fragments of them in up to 8 arenas per
    core, and its dynamic mmap threshold soon moves such buffers into those arenas too: RSS
    climbs edit after edit though nothing leaks. bench/soak.py measured +8% over 450 edits
    with the defaults. Call it before the threads start (arenas already made stay). A no-op
    off glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(_M_ARENA_MAX, arenas)) and bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    if applied:
        log.debug("malloc: %d arenas, mmap from %d bytes", arenas, _MMAP_THRESHOLD)
    return applied
