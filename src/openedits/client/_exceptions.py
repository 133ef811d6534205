"""The SDK's exception tree, built from the contract's error envelope.

::

    OpenEditsClientError
    ├── APIConnectionError                  the server could not be reached (DNS, refused, reset)
    ├── APIError                            the server answered with the error envelope
    │   ├── BadRequestError                 400 bad_request
    │   ├── NotImplementedOnServerError     400 api_not_implemented
    │   ├── PermissionDeniedError           403 forbidden (the prompt was refused)
    │   │   └── TokenMismatchedError        400 token_mismatched (token lacks the scope)
    │   ├── AuthenticationError             401 invalid_token
    │   ├── NotFoundError                   404 not_found
    │   ├── PayloadTooLargeError            413 payload_too_large
    │   ├── RateLimitError                  429 too_many_requests (.retry_after seconds)
    │   └── ServerError                     5xx api_error
    │       └── APITimeoutError             504 timeout (the task goes on; wait for it)
    ├── TaskFailedError                     the task ended failed (its record carries the error)
    │   └── TaskCancelledError              the task ended cancelled
    ├── WaitTimeoutError                    `wait` ran past its deadline (the task goes on)
    └── WebhookVerificationError            a callback whose signature does not verify

Classes are chosen by the wire `code` first and the HTTP status second, so a server that adds
codes still lands in the right branch. `APITimeoutError` and `WaitTimeoutError` also derive from
the builtin `TimeoutError`, so `except TimeoutError` catches both.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "NotFoundError",
    "NotImplementedOnServerError",
    "OpenEditsClientError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "TaskCancelledError",
    "TaskFailedError",
    "TokenMismatchedError",
    "WaitTimeoutError",
    "WebhookVerificationError",
    "error_from_response",
]


class OpenEditsClientError(Exception):
    """Root of every error the SDK raises."""


class APIConnectionError(OpenEditsClientError):
    """The request never got an answer: refused connection, DNS failure, reset, read timeout."""


class APIError(OpenEditsClientError):
    """The server answered with an error: HTTP status, wire code, message and trace id."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        trace_id: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.trace_id = trace_id
        self.body = body

    def __str__(self) -> str:
        trace = f" (trace_id {self.trace_id})" if self.trace_id else ""
        return f"{self.status} {self.code}: {self.message}{trace}"


class BadRequestError(APIError):
    """400 bad_request: a field has the wrong type or value, or the image could not be used."""


class NotImplementedOnServerError(APIError):
    """400 api_not_implemented: the server does not serve this endpoint or action."""


class PermissionDeniedError(APIError):
    """403 forbidden: the request is understood but refused (for instance, the prompt)."""


class TokenMismatchedError(PermissionDeniedError):
    """400 token_mismatched: the token is valid but not allowed to call this endpoint."""


class AuthenticationError(APIError):
    """401 invalid_token: the token is missing, malformed, unknown or revoked."""


class NotFoundError(APIError):
    """404 not_found: an unknown path or file."""


class PayloadTooLargeError(APIError):
    """413 payload_too_large: the body, image or mask is over the server's limits."""


class RateLimitError(APIError):
    """429 too_many_requests: come back after `retry_after` seconds."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        trace_id: str | None = None,
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code, trace_id=trace_id, body=body)
        self.retry_after = retry_after


class ServerError(APIError):
    """5xx: something broke on the server; the message names the trace id to report."""


class APITimeoutError(ServerError, TimeoutError):
    """504 timeout: a synchronous call ran past the server's deadline; the task goes on."""


class TaskFailedError(OpenEditsClientError):
    """The task ended failed; `code` and `message` come from its failure body."""

    def __init__(
        self,
        message: str,
        *,
        task_id: str | None,
        code: str,
        trace_id: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.task_id = task_id
        self.code = code
        self.trace_id = trace_id
        self.body = body

    def __str__(self) -> str:
        return f"task {self.task_id} failed ({self.code}): {self.message}"


class TaskCancelledError(TaskFailedError):
    """The task ended cancelled (named so as not to shadow `asyncio.CancelledError`)."""

    def __str__(self) -> str:
        return f"task {self.task_id} was cancelled"


class WaitTimeoutError(OpenEditsClientError, TimeoutError):
    """`wait` gave up before the task ended; the task goes on and stays retrievable."""

    def __init__(self, message: str, *, task_id: str, progress: int | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.progress = progress


class WebhookVerificationError(OpenEditsClientError):
    """A callback's Standard Webhooks signature, id or timestamp does not verify."""


_BY_CODE: dict[str, type[APIError]] = {
    "bad_request": BadRequestError,
    "api_not_implemented": NotImplementedOnServerError,
    "token_mismatched": TokenMismatchedError,
    "forbidden": PermissionDeniedError,
    "invalid_token": AuthenticationError,
    "not_found": NotFoundError,
    "payload_too_large": PayloadTooLargeError,
    "too_many_requests": RateLimitError,
    "timeout": APITimeoutError,
    "api_error": ServerError,
}

_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    429: RateLimitError,
    504: APITimeoutError,
}


def _parse_retry_after(value: str | None) -> float | None:
    # Retry-After may also be an HTTP date; the contract sends seconds, so a date is ignored
    # rather than parsed (the caller then falls back to its own backoff).
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def error_from_response(status: int, body: Any, headers: Any = None) -> APIError:
    """Build the matching `APIError` subclass from an HTTP status, a decoded body and headers.

    `body` may be the contract's envelope, some other JSON (a proxy's page) or raw text; the
    message always says something useful.
    """
    code = ""
    message = ""
    trace_id: str | None = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            code = str(error.get("code") or "")
            message = str(error.get("message") or "")
        elif isinstance(error, str):
            message = error
        raw_trace = body.get("trace_id")
        trace_id = str(raw_trace) if raw_trace else None
        if not message and isinstance(body.get("detail"), str):
            message = body["detail"]
    elif isinstance(body, str) and body.strip():
        # Not the envelope (a proxy or load balancer answered); keep its first line, trimmed.
        message = body.strip().splitlines()[0][:200]
    if trace_id is None and headers is not None:
        trace_id = headers.get("x-trace-id")
    if not message:
        message = f"the server answered HTTP {status} without an error message"

    cls = _BY_CODE.get(code) or _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else APIError
    if not code:
        code = "api_error" if status >= 500 else f"http_{status}"
    if cls is RateLimitError:
        retry_after = _parse_retry_after(headers.get("retry-after") if headers else None)
        return RateLimitError(
            message, status=status, code=code, trace_id=trace_id, body=body, retry_after=retry_after
        )
    return cls(message, status=status, code=code, trace_id=trace_id, body=body)
