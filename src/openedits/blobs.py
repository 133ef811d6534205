"""Result storage: where grids and variants are written and how their URLs are formed."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import quote, urlsplit

from openedits.errors import NotFound

if TYPE_CHECKING:
    from openedits.settings import Settings

__all__ = ["Blobs", "LocalBlobs", "S3Blobs", "check_key", "create_blobs"]

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


class S3Blobs:
    """Blobs in an S3-compatible bucket under a key prefix, through boto3.

    Credentials, region and endpoint come from boto3's standard chain (`AWS_ACCESS_KEY_ID`,
    `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, profiles, instance roles), so an
    operator configures it as any other AWS client. Links are, in order of preference: under
    `public_url` (a CDN or a public bucket), presigned for `presign_seconds`, or this server's own
    `/files/<key>`, which any API node answers from the bucket.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        public_url: str | None = None,
        presign_seconds: int = 0,
        addressing_style: str = "path",
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.public_url = public_url.rstrip("/") if public_url else None
        self.presign_seconds = presign_seconds
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:  # pragma: no cover - the scale extra is missing
                raise ValueError(
                    "OPENEDITS_BLOBS_URL=s3://… needs boto3: pip install 'openedits[scale]'"
                ) from None
            client = boto3.client(
                "s3",
                config=Config(
                    s3={"addressing_style": addressing_style},
                    signature_version="s3v4",
                    retries={"max_attempts": 5, "mode": "standard"},
                ),
            )
        self.client = client

    def _object(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """One PUT: S3 objects appear whole or not at all."""
        self.client.put_object(
            Bucket=self.bucket, Key=self._object(key), Body=data, ContentType=content_type
        )

    def get(self, key: str) -> bytes:
        """Read the object; NotFound when it is absent."""
        from botocore.exceptions import ClientError

        try:
            found = self.client.get_object(Bucket=self.bucket, Key=self._object(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
                raise NotFound(f"no file {key!r}") from None
            raise
        body: bytes = found["Body"].read()
        return body

    def local_path(self, key: str) -> Path | None:
        """Never local."""
        return None

    def url(self, key: str, base_url: str) -> str:
        """A public, presigned or `/files/...` link (see the class docstring)."""
        name = self._object(key)
        if self.public_url:
            return f"{self.public_url}/{quote(name)}"
        if self.presign_seconds:
            url: str = self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": name},
                ExpiresIn=self.presign_seconds,
            )
            return url
        return f"{base_url.rstrip('/')}/files/{check_key(key)}"

    def delete(self, key: str) -> None:
        """Remove the object (S3 answers success when it is already gone)."""
        self.client.delete_object(Bucket=self.bucket, Key=self._object(key))


def create_blobs(
    blobs_url: str | None, default_root: Path, settings: Settings | None = None
) -> Blobs:
    """Blobs for OPENEDITS_BLOBS_URL: a local folder (default, or file:// path), or s3://."""
    if not blobs_url:
        return LocalBlobs(default_root)
    if blobs_url.startswith("file://"):
        return LocalBlobs(Path(blobs_url.removeprefix("file://")))
    if blobs_url.startswith("s3://"):
        parts = urlsplit(blobs_url)
        if not parts.netloc:
            raise ValueError(
                f"OPENEDITS_BLOBS_URL {blobs_url!r} names no bucket; use s3://bucket/prefix"
            )
        return S3Blobs(
            parts.netloc,
            parts.path,
            public_url=settings.blobs_public_url if settings else None,
            presign_seconds=settings.blobs_presign_seconds if settings else 0,
            addressing_style=settings.blobs_addressing_style if settings else "path",
        )
    raise ValueError(
        f"OPENEDITS_BLOBS_URL {blobs_url!r} is not supported; use file:///path or "
        "s3://bucket/prefix"
    )
