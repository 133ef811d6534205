"""Typed views of the contract's bodies: the edit result, the task record, a page of records."""

from __future__ import annotations

import os
import posixpath
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

__all__ = ["EditResult", "TaskPage", "TaskRecord", "TaskStatus"]

TaskStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


class _SyncDownloader(Protocol):
    def download(self, url: str) -> bytes: ...


class _AsyncDownloader(Protocol):
    async def download(self, url: str) -> bytes: ...


class EditResult(BaseModel):
    """The result body of an edit: the grid, the variants, their sizes and the task id.

    Every field is optional because the same shape carries progress lines (only `task_id` and
    `progress`) and final results. Fields the contract does not name are kept (`extra="allow"`),
    so nothing a newer server sends is lost.
    """

    model_config = ConfigDict(extra="allow", frozen=False)

    success: bool | None = None
    task_id: str | None = None
    trace_id: str | None = None
    image_id: str | None = None
    image_url: str | None = None
    image_width: int | None = None
    image_height: int | None = None
    raw_image_url: str | None = None
    raw_image_width: int | None = None
    raw_image_height: int | None = None
    sub_image_urls: list[str] = Field(default_factory=list)
    progress: int = 0
    actions: list[str] = Field(default_factory=list)

    # The client that produced this result, used by `save`/`asave` to download with the same
    # connection pool, transport and token; None for a result built by hand.
    _downloader: Any = PrivateAttr(default=None)

    @property
    def done(self) -> bool:
        """True once the edit succeeded and the grid's URL is known."""
        return self.success is True and bool(self.image_url)

    def files(self) -> list[tuple[str, str]]:
        """`(file name, url)` of the grid and each variant, in the order `save` writes them."""
        named: list[tuple[str, str]] = []
        if self.image_url:
            named.append((f"grid{_suffix(self.image_url)}", self.image_url))
        for index, url in enumerate(self.sub_image_urls):
            named.append((f"0_{index}{_suffix(url)}", url))
        return named

    def save(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Download the grid and the variants into `directory` (created if needed).

        Files are named `grid.png` and `0_0.png` … `0_3.png` whatever the URLs look like, so a
        result from a CDN with long signed names lands the same way. Returns the written paths.
        """
        from ._client import Client  # late: _client imports this module

        if isinstance(self._downloader, Client):
            return _write_all(self.files(), directory, self._downloader)
        # A hand-built result, or one from an AsyncClient: borrow a plain sync client.
        with Client(base_url="http://unused.invalid") as client:
            return _write_all(self.files(), directory, client)

    async def asave(self, directory: str | os.PathLike[str]) -> list[Path]:
        """`save`, awaited: downloads with the AsyncClient that produced this result."""
        from ._async_client import AsyncClient  # late: _async_client imports this module

        if isinstance(self._downloader, AsyncClient):
            return await _awrite_all(self.files(), directory, self._downloader)
        async with AsyncClient(base_url="http://unused.invalid") as client:
            return await _awrite_all(self.files(), directory, client)


class TaskRecord(BaseModel):
    """A task record from `/midjourney/tasks`, with its state judged the hosted way."""

    model_config = ConfigDict(extra="allow")

    id: str
    type: str | None = None
    trace_id: str | None = None
    request: dict[str, Any] = Field(default_factory=dict)
    response: dict[str, Any] | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    elapsed: float | None = None
    state: str | None = None

    _downloader: Any = PrivateAttr(default=None)

    @property
    def status(self) -> TaskStatus:
        """pending, running, succeeded, failed or cancelled.

        Judged from `response` as the hosted service's clients do (no response = pending,
        progress < 100 = running, success true/false = done/failed); openedits' own `state`
        only sharpens what that cannot tell apart (a cancelled task is a failed one to them).
        """
        response = self.response
        if self.state == "cancelled" or _error_code(response) == "cancelled":
            return "cancelled"
        if not response:
            return "running" if self.state == "running" else "pending"
        success = response.get("success")
        if success is True:
            return "succeeded"
        if success is False:
            return "failed"
        return "running"

    @property
    def ended(self) -> bool:
        """True when the task succeeded, failed or was cancelled."""
        return self.status in ("succeeded", "failed", "cancelled")

    @property
    def progress(self) -> int:
        """0 to 100; 100 once the task succeeded."""
        if not self.response:
            return 0
        try:
            return int(self.response.get("progress") or 0)
        except (TypeError, ValueError):
            return 0

    @property
    def result(self) -> EditResult | None:
        """The final result once the task succeeded, else None."""
        if self.status != "succeeded" or self.response is None:
            return None
        result = EditResult.model_validate({"task_id": self.id, **self.response})
        result._downloader = self._downloader
        return result

    @property
    def error(self) -> dict[str, Any] | None:
        """The failure's `{"code", "message"}` once the task failed or was cancelled."""
        if self.status not in ("failed", "cancelled"):
            return None
        response_error = (self.response or {}).get("error")
        if isinstance(response_error, dict):
            return response_error
        top = getattr(self, "__pydantic_extra__", None) or {}
        if isinstance(top.get("error"), dict):
            return dict(top["error"])
        return {"code": "cancelled" if self.status == "cancelled" else "api_error", "message": ""}


class TaskPage(BaseModel):
    """One page of `retrieve_batch`: the records and the total count."""

    model_config = ConfigDict(extra="allow")

    items: list[TaskRecord] = Field(default_factory=list)
    count: int = 0


def _error_code(response: dict[str, Any] | None) -> str | None:
    if not response:
        return None
    error = response.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        return str(code) if code is not None else None
    return None


def _suffix(url: str) -> str:
    # The contract serves PNG; keep another image suffix only when the URL plainly says so.
    path = urllib.parse.urlsplit(url).path
    suffix = posixpath.splitext(path)[1].lower()
    return suffix if suffix in _IMAGE_SUFFIXES else ".png"


def _write_atomic(path: Path, data: bytes) -> None:
    # Write beside the target and rename, so an interrupted download never leaves a truncated
    # image that looks finished.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_all(
    files: list[tuple[str, str]], directory: str | os.PathLike[str], downloader: _SyncDownloader
) -> list[Path]:
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, url in files:
        path = target / name
        _write_atomic(path, downloader.download(url))
        written.append(path)
    return written


async def _awrite_all(
    files: list[tuple[str, str]], directory: str | os.PathLike[str], downloader: _AsyncDownloader
) -> list[Path]:
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, url in files:
        path = target / name
        _write_atomic(path, await downloader.download(url))
        written.append(path)
    return written
