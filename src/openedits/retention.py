"""Retention: ended tasks, their files and their callbacks go OPENEDITS_RETENTION_DAYS later."""

from __future__ import annotations

import logging
import time

from openedits.runtime import Runtime
from openedits.webhooks.outbox import Outbox

__all__ = ["PURGE_EVERY", "RESULT_FILES", "purge_expired", "purge_when_due"]

log = logging.getLogger(__name__)

PURGE_EVERY = 3600.0
"""Seconds between retention passes: retention is counted in days, so once an hour is plenty."""

# Every name a result file can have, in each output format.
RESULT_FILES = tuple(
    f"{stem}{ext}"
    for ext in (".png", ".webp", ".jpg")
    for stem in ("grid", "0_0", "0_1", "0_2", "0_3")
)


def purge_expired(rt: Runtime, *, batch: int = 500) -> int:
    """Delete the files and rows of tasks that ended more than the retention ago, and the
    callback deliveries (with their attempts) that did; returns how many tasks went.

    Files go first: a crash in between leaves a row whose files are gone, which the next pass
    deletes, never files that no row points to."""
    cutoff = rt.clock() - rt.settings.retention_days * 86400
    purged = 0
    while True:
        ids = rt.store.ended_before(cutoff, limit=batch)
        for task_id in ids:
            for name in RESULT_FILES:
                rt.blobs.delete(f"{task_id}/{name}")
            if rt.store.forget(task_id, cutoff):
                purged += 1
        if len(ids) < batch:
            break
    if rt.store.input_files is not None:
        # Inline inputs a crash left behind (written, then no row; ended, then not unlinked).
        rt.store.input_files.sweep(rt.store.live)
    if purged:
        log.info("retention: forgot %d tasks that ended over %g days ago", purged,
                 rt.settings.retention_days)
    # Callback deliveries go on their own clock (when each was delivered or given up), so a
    # failed one stays listed, and can be re-sent, for the whole retention after it failed.
    deliveries = Outbox(rt.db, clock=rt.clock).prune(cutoff, batch=batch)
    if deliveries:
        log.info("retention: forgot %d callback deliveries that ended over %g days ago",
                 deliveries, rt.settings.retention_days)
    return purged


def purge_when_due(rt: Runtime, due: float) -> float:
    """Run a retention pass if the monotonic clock has reached `due` (a failure is logged, not
    raised: the next pass retries); returns when the next pass is due. A dispatcher's reaper
    loop calls this on each of its turns, starting from 0.0 (a pass at once)."""
    now = time.monotonic()
    if now < due:
        return due
    try:
        purge_expired(rt)
    except Exception:
        log.exception("purging expired tasks failed")
    return now + PURGE_EVERY
