"""GET /files/<task_id>/<name>: result files from the local blob store."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from openedits.api.deps import RuntimeDep
from openedits.blobs import CONTENT_TYPES, check_key
from openedits.errors import NotFound

__all__ = ["router"]

router = APIRouter(tags=["files"])


@router.get("/files/{task_id}/{name}", response_class=Response)
def get_file(task_id: str, name: str, rt: RuntimeDep) -> Response:
    """A grid or variant image. Keys are validated, so no path can leave the store."""
    key = check_key(f"{task_id}/{name}")
    media_type = CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
    path = rt.blobs.local_path(key)
    if path is not None:
        return FileResponse(
            path, media_type=media_type, headers={"cache-control": "public, max-age=31536000"}
        )
    try:
        data = rt.blobs.get(key)
    except NotFound:
        raise NotFound(f"no file {name!r} for task {task_id!r}") from None
    return Response(data, media_type=media_type)
