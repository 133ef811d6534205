"""The I/O-free half of the SDK: request bodies, reply decoding, retries and the polling schedule.

`Client` and `AsyncClient` share everything here and differ only in how they send and sleep,
so the two cannot drift apart in what they put on the wire or how they read it.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from openedits import __version__

from ._exceptions import (
    APIConnectionError,
    APIError,
    RateLimitError,
    ServerError,
    TaskCancelledError,
    TaskFailedError,
    WaitTimeoutError,
    error_from_response,
)
from ._models import EditResult, TaskPage, TaskRecord
from ._sources import ImageSource, to_image_url

__all__ = [
    "DEFAULT_BASE_URL",
    "EDITS_PATH",
    "NDJSON",
    "TASKS_PATH",
    "Poller",
    "base_headers",
    "build_edit_body",
    "decode_json",
    "failure_from_body",
    "is_final_result",
    "new_idempotency_key",
    "parse_page",
    "parse_record",
    "parse_result",
    "retry_delay",
    "same_origin",
    "submitted_task_id",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
EDITS_PATH = "/midjourney/edits"
TASKS_PATH = "/midjourney/tasks"
NDJSON = "application/x-ndjson"


def base_headers(token: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    """Headers every call sends: the bearer token, JSON in and out, and who is calling."""
    headers = {
        "accept": "application/json",
        "content-type": "application/json",
        "user-agent": f"openedits-python/{__version__}",
    }
    if token:
        headers["authorization"] = f"Bearer {token}"
    headers.update(extra or {})
    return headers


def new_idempotency_key() -> str:
    """A fresh key for one logical submit; retries of that submit reuse it."""
    return str(uuid.uuid4())


def build_edit_body(
    *,
    image: ImageSource,
    prompt: str,
    mask: ImageSource | None,
    split_images: bool,
    mode: str | None,
    callback_url: str | None,
    asynchronous: bool,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The JSON body of `POST /midjourney/edits`; absent options are left out, not sent as null."""
    body: dict[str, Any] = {
        "action": "generate",
        "image_url": to_image_url(image, field="image"),
        "prompt": prompt,
        "split_images": split_images,
    }
    if mask is not None:
        body["mask"] = to_image_url(mask, field="mask")
    if mode is not None:
        body["mode"] = mode
    if callback_url is not None:
        body["callback_url"] = callback_url
    if asynchronous:
        body["async"] = True
    body.update(extra or {})
    return body


def decode_json(response: httpx.Response) -> Any:
    """The reply's JSON object; raises the matching `APIError` for an error status or non-JSON."""
    text = response.text
    try:
        body: Any = json.loads(text) if text.strip() else {}
    except ValueError:
        body = text
    if response.status_code >= 400:
        raise error_from_response(response.status_code, body, response.headers)
    if not isinstance(body, dict):
        raise APIError(
            f"expected a JSON object from {response.request.url}, got {text[:120]!r}",
            status=response.status_code,
            code="invalid_response",
            trace_id=response.headers.get("x-trace-id"),
            body=text,
        )
    return body


def failure_from_body(body: Mapping[str, Any]) -> TaskFailedError:
    """The exception for a failure body (`success: false` with an `error`) of a task."""
    error = body.get("error")
    code = "api_error"
    message = "the task failed without a message"
    if isinstance(error, dict):
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
    elif isinstance(error, str):
        message = error
    cls = TaskCancelledError if code == "cancelled" else TaskFailedError
    trace = body.get("trace_id")
    return cls(
        message,
        task_id=body.get("task_id") or body.get("id"),
        code=code,
        trace_id=str(trace) if trace else None,
        body=dict(body),
    )


def is_final_result(body: Mapping[str, Any]) -> bool:
    """True for a finished, successful result body (not a bare `{"task_id"}` acknowledgement)."""
    return body.get("success") is True and bool(body.get("image_url"))


def submitted_task_id(body: Mapping[str, Any]) -> str:
    """The task id of a submit reply: `{"success": true, "task_id"}` or the hosted `{"task_id"}`."""
    if body.get("success") is False:
        raise failure_from_body(body)
    task_id = body.get("task_id")
    if not task_id:
        raise APIError(
            f"the server accepted the edit but sent no task_id: {json.dumps(body)[:200]}",
            status=200,
            code="invalid_response",
            trace_id=body.get("trace_id"),
            body=dict(body),
        )
    return str(task_id)


def parse_record(body: Mapping[str, Any], downloader: object) -> TaskRecord | None:
    """A task record, or None for the contract's `{}` (no such task visible to this token)."""
    if not body or not body.get("id"):
        return None
    record = TaskRecord.model_validate(body)
    record._downloader = downloader
    return record


def parse_page(body: Mapping[str, Any], downloader: object) -> TaskPage:
    """A `retrieve_batch` page; each record can download its own result."""
    page = TaskPage.model_validate(body)
    for record in page.items:
        record._downloader = downloader
    return page


def parse_result(body: Mapping[str, Any], downloader: object) -> EditResult:
    """A result body (final or a progress line) as an `EditResult`."""
    result = EditResult.model_validate(body)
    result._downloader = downloader
    return result


def same_origin(url: str, base_url: str) -> bool:
    """Whether `url` lives on the API server, so that it may be sent the bearer token.

    Result URLs on a CDN or object store must never see the token.
    """
    a, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(base_url)
    return (a.scheme, a.netloc.lower()) == (b.scheme, b.netloc.lower())


def retry_delay(error: Exception, attempt: int) -> float | None:
    """Seconds to wait before retrying after `error` on try number `attempt` (0-based), or None.

    Retried: refused/reset connections, 429 (after its Retry-After) and the 502/503 a proxy sends
    while the server restarts. Not retried: 500 (a bug will not fix itself), 504 (the task
    exists; waiting on it is the answer) and every 4xx but 429.
    """
    backoff = min(0.5 * 2.0**attempt, 8.0)
    if isinstance(error, RateLimitError):
        return error.retry_after if error.retry_after is not None else backoff
    if isinstance(error, APIConnectionError):
        return backoff
    if isinstance(error, ServerError) and error.status in (502, 503):
        return backoff
    return None


class Poller:
    """The polling schedule and the verdict on each record while waiting for a task.

    Intervals start at `interval` and grow by half each poll up to `max_interval`, so short
    edits return quickly and long ones do not hammer the server; the last sleep is cut to the
    deadline so `wait(timeout=…)` keeps its word.
    """

    def __init__(
        self,
        task_id: str,
        *,
        timeout: float | None,
        interval: float,
        max_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.task_id = task_id
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout
        self._timeout = timeout
        self._interval = interval
        self._max_interval = max(interval, max_interval)
        self.progress: int | None = None

    def verdict(self, record: TaskRecord | None) -> EditResult | None:
        """The result once the task succeeded; raises once it failed; None while it runs.

        A missing record (`{}`) counts as not yet visible: a store replica can lag the submit.
        """
        if record is None:
            return None
        self.progress = record.progress
        status = record.status
        if status == "succeeded":
            return record.result
        if status in ("failed", "cancelled"):
            error = record.error or {}
            body = {"task_id": record.id, "trace_id": record.trace_id, "error": error}
            if status == "cancelled":
                body["error"] = {"code": "cancelled", "message": error.get("message", "")}
            raise failure_from_body(body)
        return None

    def next_delay(self) -> float:
        """Seconds to sleep before the next poll; raises `WaitTimeoutError` past the deadline."""
        delay = self._interval
        self._interval = min(self._interval * 1.5, self._max_interval)
        if self._deadline is None:
            return delay
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            progress = "" if self.progress is None else f" at {self.progress}%"
            raise WaitTimeoutError(
                f"task {self.task_id} had not ended after {self._timeout:g}s{progress}; it goes "
                "on, retrieve it later or wait again",
                task_id=self.task_id,
                progress=self.progress,
            )
        return min(delay, remaining)
