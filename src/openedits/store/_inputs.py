"""Inline inputs: packed beside a payload's JSON body, and on a single-host store kept in one file
per live task (InputFiles) instead of in the database."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["IN_FILE", "InlineInput", "InputFiles", "pack", "unpack"]

log = logging.getLogger(__name__)

# Task ids openedits makes are UUIDs; any id of these characters is a safe file name.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_SWEEP_AFTER_SECONDS = 3600.0
"""A file whose task is not live is removed by the sweep once it is this old: far longer than
a submit takes between writing its file and committing its row."""
# A packed payload body (see pack) keeps the rest of the submit body under this key, and says
# under this one that its inline data is in the task's input file.
_PACKED = "body"
IN_FILE = "in_file"


@dataclass(frozen=True)
class InlineInput:
    """An input sent inline: its base64 text as ASCII bytes (kept in the payload's `data`
    column or its task's input file, never in its JSON body), and the text before it (a data: URI's
    `data:image/png;base64,` head, or "" for bare base64)."""

    prefix: str
    encoded: bytes


def pack(
    payload: dict[str, Any], inline: Mapping[str, InlineInput]
) -> tuple[dict[str, Any], bytes | None]:
    """The payload row's (body, data): inline inputs one after another in `data`, and where
    each one lies (field, prefix, length) in the body's `inline` list. Megabytes of base64
    then never pass through a JSON encoder, on the way in or out."""
    if not inline:
        return payload, None
    layout = [[name, item.prefix, len(item.encoded)] for name, item in inline.items()]
    rest = {k: v for k, v in payload.items() if k not in inline}
    return {_PACKED: rest, "inline": layout}, b"".join(item.encoded for item in inline.values())


def unpack(body: dict[str, Any], data: bytes | None) -> dict[str, Any]:
    """The inverse of pack: the body with each inline input in its field again."""
    if data is None or _PACKED not in body:
        return dict(body)
    out = dict(body[_PACKED])
    offset = 0
    for name, prefix, length in body["inline"]:
        out[name] = prefix + data[offset:offset + length].decode("ascii")
        offset += length
    return out


class InputFiles:
    """The inline inputs of SQLite-backed tasks, each task's in one file.

    Measured with bench/submit.py: writing a 600 KB body's inputs into SQLite costs about three
    times the CPU of one plain file write (the WAL frame, then the checkpoint's second copy
    into the database file), and it is done in the store's one write slot, so every submit
    queued behind it waited. A file is written by the submitting thread alone, before its row
    is committed, so a reply still comes only once both are on disk (page cache: a `kill -9`
    loses neither; the same promise as SQLite's WAL at synchronous=NORMAL).

    A crash between the write and the commit, or between a task's end and the unlink, leaves a
    file no live task owns; `sweep` removes those.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def holds(task_id: str) -> bool:
        """Whether this task id can name a file here (others keep their inputs in the row)."""
        return _NAME.match(task_id) is not None

    def _path(self, task_id: str) -> Path:
        if not self.holds(task_id):
            raise ValueError(f"not a task id that names a file: {task_id!r}")
        return self.root / task_id

    def write(self, task_id: str, data: bytes) -> None:
        """Write the task's inputs; the file must not exist yet."""
        fd = os.open(self._path(task_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def read(self, task_id: str) -> bytes | None:
        """The task's inputs, or None when the file is gone."""
        try:
            return self._path(task_id).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, task_id: str) -> None:
        """Remove the task's inputs (no error if absent)."""
        if not self.holds(task_id):
            return
        with contextlib.suppress(FileNotFoundError):
            self._path(task_id).unlink()

    def sweep(
        self,
        live: Callable[[Collection[str]], set[str]],
        *,
        older_than: float = _SWEEP_AFTER_SECONDS,
        batch: int = 500,
    ) -> int:
        """Remove files older than `older_than` seconds whose task `live` does not name (ended
        or gone); returns how many went."""
        cutoff = time.time() - older_than
        removed = 0
        candidates: list[str] = []

        def flush() -> None:
            nonlocal removed
            keep = live(candidates)
            for task_id in candidates:
                if task_id not in keep:
                    self.delete(task_id)
                    removed += 1
            candidates.clear()

        with os.scandir(self.root) as entries:
            for entry in entries:
                if not self.holds(entry.name):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < cutoff:
                        candidates.append(entry.name)
                if len(candidates) >= batch:
                    flush()
        if candidates:
            flush()
        if removed:
            log.info("removed %d inline-input files that no live task owns", removed)
        return removed
