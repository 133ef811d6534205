"""Retention: ended tasks, their files and their callbacks go OPENEDITS_RETENTION_DAYS later."""

from __future__ import annotations

import logging

from openedits.runtime import Runtime
from openedits.webhooks.outbox import Outbox

__all__ = ["RESULT_FILES", "purge_expired"]

log = logging.getLogger(__name__)

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
