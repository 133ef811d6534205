"""Result storage: where grids and variants are written and how their URLs are formed."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

from openedits.errors import NotFound

__all__ = ["Blobs", "LocalBlobs", "check_key", "create_blobs"]

# Keys are "<task uuid>/<file name>"; anything else is refused, which is what keeps
# GET /files/... from ever walking out of the storage folder.
_KEY = re.compile(r"^[0-9a-f-]{36}/[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}


def check_key(key: str) -> str:
    """Return `key` if it is a well-formed blob key, else raise NotFound."""
    if not _KEY.match(key) or ".." in key:
        raise NotFound(f"no file {key!r}; files are named /files/<task_id>/<name>")
    return key


@runtime_checkable
class Blobs(Protocol):
    """A place for result files."""

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key`, atomically."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes under `key`; NotFound if absent."""
        ...

    def local_path(self, key: str) -> Path | None:
        """A local file holding the blob, for zero-copy serving; None when remote."""
        ...

    def url(self, key: str, base_url: str) -> str:
        """The URL a client fetches the blob from."""
        ...

    def delete(self, key: str) -> None:
        """Remove the blob (no error if absent)."""
        ...


class LocalBlobs:
    """Blobs in a local folder, served by openedits at /files/<key>."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write to a temp file and rename, so a reader never sees half a file."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        """Read the blob."""
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"no file {key!r}")
        return path.read_bytes()

    def local_path(self, key: str) -> Path | None:
        """The file, if it exists."""
        path = self._path(key)
        return path if path.is_file() else None

    def url(self, key: str, base_url: str) -> str:
        """`<base>/files/<key>`."""
        return f"{base_url.rstrip('/')}/files/{check_key(key)}"

    def delete(self, key: str) -> None:
        """Remove the file."""
        self._path(key).unlink(missing_ok=True)


def create_blobs(blobs_url: str | None, default_root: Path) -> Blobs:
    """Blobs for OPENEDITS_BLOBS_URL: a local folder (default, or file:// path)."""
    if not blobs_url:
        return LocalBlobs(default_root)
    if blobs_url.startswith("file://"):
        return LocalBlobs(Path(blobs_url.removeprefix("file://")))
    raise ValueError(
        f"OPENEDITS_BLOBS_URL {blobs_url!r} is not supported; use file:///path"
    )
