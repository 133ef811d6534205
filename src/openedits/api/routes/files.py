"""GET /files/<task_id>/<name>: result files from the blob store, and small renditions of them."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from openedits.api.deps import RuntimeDep
from openedits.blobs import CONTENT_TYPES, check_key
from openedits.errors import InvalidInput, NotFound, describe_value
from openedits.imaging.thumbnail import THUMBNAIL_WIDTHS, ThumbnailCache, thumbnail_webp

__all__ = ["cache_control", "router"]

router = APIRouter(tags=["files"])

_THUMBNAILS = ThumbnailCache()
_DAY = 86_400


def cache_control(retention_seconds: float, written_at: float | None, now: float) -> str:
    """Cache a result no longer than it lives: retention deletes it `retention_seconds` after
    its task ended (about when it was written). Within that life it never changes."""
    if written_at is None:
        # Remote blobs: their age is unknown here, so caches keep them a day at most.
        remaining = min(retention_seconds, _DAY)
    else:
        remaining = written_at + retention_seconds - now
    remaining = int(max(0, remaining))
    return f"public, max-age={remaining}, immutable" if remaining else "no-store"


def _width(raw: str | None) -> int | None:
    if raw is None:
        return None
    allowed = ", ".join(str(w) for w in THUMBNAIL_WIDTHS)
    if not raw.isdigit() or int(raw) not in THUMBNAIL_WIDTHS:
        raise InvalidInput(f"w: got {describe_value(raw)}; expected one of {allowed} (the "
                           "width of a small rendition), or no w for the file itself")
    return int(raw)


@router.head("/files/{task_id}/{name}", response_class=Response, include_in_schema=False)
@router.get("/files/{task_id}/{name}", response_class=Response)
def get_file(task_id: str, name: str, request: Request, rt: RuntimeDep) -> Response:
    """A grid or variant image; with `?w=128|256|512|1024` a WebP at most that wide. Keys are
    validated, so no path can leave the store."""
    key = check_key(f"{task_id}/{name}")
    width = _width(request.query_params.get("w"))
    media_type = CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
    retention = rt.settings.retention_days * _DAY
    path = rt.blobs.local_path(key)
    try:
        written_at = path.stat().st_mtime if path is not None else None
    except FileNotFoundError:  # deleted by retention just now
        raise NotFound(f"no file {name!r} for task {task_id!r}") from None
    headers = {"cache-control": cache_control(retention, written_at, time.time())}
    if path is not None and width is None:
        return FileResponse(path, media_type=media_type, headers=headers)
    version = str(written_at)
    if width is not None:
        cached = _THUMBNAILS.get(key, width, version)
        if cached is not None:
            return Response(cached, media_type="image/webp", headers=headers)
    try:
        data = path.read_bytes() if path is not None else rt.blobs.get(key)
    except (NotFound, FileNotFoundError):
        raise NotFound(f"no file {name!r} for task {task_id!r}") from None
    if width is None:
        return Response(data, media_type=media_type, headers=headers)
    small = thumbnail_webp(data, width)
    _THUMBNAILS.put(key, width, version, small)
    return Response(small, media_type="image/webp", headers=headers)
