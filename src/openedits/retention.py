"""Retention: tasks and their result files are forgotten OPENEDITS_RETENTION_DAYS after they end."""

from __future__ import annotations

import logging

from openedits.runtime import Runtime

__all__ = ["RESULT_FILES", "purge_expired"]

log = logging.getLogger(__name__)

# Every name a result file can have, in each output format.
RESULT_FILES = tuple(
    f"{stem}{ext}"
    for ext in (".png", ".webp", ".jpg")
    for stem in ("grid", "0_0", "0_1", "0_2", "0_3")
)


def purge_expired(rt: Runtime, *, batch: int = 500) -> int:
    """Delete the files and rows of tasks that ended more than the retention ago; returns how
    many tasks went. Files go first: a crash in between leaves a row whose files are gone,
    which the next pass deletes, never files that no row points to."""
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
    if purged:
        log.info("retention: forgot %d tasks that ended over %g days ago", purged,
                 rt.settings.retention_days)
    return purged
