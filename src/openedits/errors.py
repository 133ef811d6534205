"""The error tree: every failure a client can see, with its HTTP status and wire code.

::

    OpenEditsError                      500 api_error
    ├── InvalidInput                    400 bad_request
    │   ├── FetchRefused                400 bad_request   (a client URL we will not fetch or call)
    │   ├── FetchFailed                 400 bad_request   (a client URL that could not be fetched)
    │   └── ImageInvalid                400 bad_request   (bytes that are no usable image or mask)
    ├── TokenMismatched                 400 token_mismatched
    ├── NotImplementedOnServer          400 api_not_implemented
    ├── TokenInvalid                    401 invalid_token
    ├── PromptRefused                   403 forbidden
    ├── NotFound                        404 not_found
    │   └── TaskNotFound                404 not_found
    ├── PayloadTooLarge                 413 payload_too_large
    │   └── ImageTooLarge               413 payload_too_large
    ├── RateLimited                     429 too_many_requests (carries retry_after)
    │   └── QueueFull                   429 too_many_requests
    ├── EngineUnavailable               500 api_error     (a missing extra, unloadable weights)
    ├── EngineFailed                    500 api_error     (the engine broke while editing)
    ├── TaskCancelled                   409 cancelled     (in task records only)
    └── SyncTimeout                     504 timeout

Workers and engines raise these; only the API's one handler turns them into HTTP responses.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "EngineFailed",
    "EngineUnavailable",
    "FetchFailed",
    "FetchRefused",
    "ImageInvalid",
    "ImageTooLarge",
    "InvalidInput",
    "NotFound",
    "NotImplementedOnServer",
    "OpenEditsError",
    "PayloadTooLarge",
    "PromptRefused",
    "QueueFull",
    "RateLimited",
    "SyncTimeout",
    "TaskCancelled",
    "TaskNotFound",
    "TokenInvalid",
    "TokenMismatched",
    "describe_value",
    "validation_message",
]


def describe_value(value: Any, limit: int = 80) -> str:
    """Render a client-sent value for an error message: repr'd and trimmed, never huge."""
    text = repr(value)
    if len(text) > limit:
        text = f"{text[: limit - 20]}…{text[-12:]} ({len(text)} chars)"
    return text


_HINTS = {
    "image_url": "an http(s) URL or a data:image/...;base64, URI",
    "prompt": "a string of 1 to 4,000 characters",
    "mask": "bare base64, a data: URI or an http(s) URL of a PNG/JPEG/WebP",
    "mode": "one of fast, relax, turbo",
    "split_images": "true or false",
    "async": "true or false",
    "callback_url": "an http(s) URL",
    "output_format": "one of png, webp, jpeg",
    "output_quality": "an integer from 1 to 100 (webp and jpeg quality)",
}


def validation_message(errors: list[Any]) -> str:
    """Turn pydantic errors into one sentence per field: the field, what came, what is allowed."""
    parts = []
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        field = ".".join(loc) or "body"
        if err.get("type") == "missing":
            hint = _HINTS.get(field)
            parts.append(f"{field} is required" + (f" ({hint})" if hint else ""))
            continue
        got = describe_value(err.get("input"))
        rule = _HINTS.get(field) or str(err.get("msg", "invalid")).rstrip(".")
        parts.append(f"{field}: got {got}; expected {rule}")
    return "; ".join(parts)


class OpenEditsError(Exception):
    """Root of every error openedits reports; knows its HTTP status and wire code."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "api_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def to_error(self) -> dict[str, str]:
        """The `error` object of the wire envelope."""
        return {"code": self.code, "message": self.message}


class InvalidInput(OpenEditsError):
    """A field has the wrong type or value."""

    status_code = 400
    code = "bad_request"


class FetchRefused(InvalidInput):
    """A client-supplied URL that openedits refuses to fetch or call (scheme, address, redirect)."""


class FetchFailed(InvalidInput):
    """A client-supplied URL that could not be fetched (network error, HTTP error, timeout)."""


class ImageInvalid(InvalidInput):
    """Bytes that do not decode to a usable image or mask."""


class TokenMismatched(OpenEditsError):
    """A valid token used outside its scopes."""

    status_code = 400
    code = "token_mismatched"


class NotImplementedOnServer(OpenEditsError):
    """A hosted-service endpoint or action openedits does not serve."""

    status_code = 400
    code = "api_not_implemented"


class TokenInvalid(OpenEditsError):
    """Missing, malformed, unknown or revoked token."""

    status_code = 401
    code = "invalid_token"


class PromptRefused(OpenEditsError):
    """The prompt hit the moderation word list."""

    status_code = 403
    code = "forbidden"


class NotFound(OpenEditsError):
    """An unknown path or file."""

    status_code = 404
    code = "not_found"


class TaskNotFound(NotFound):
    """No task with that id is visible to the caller."""


class PayloadTooLarge(OpenEditsError):
    """The request body is over the configured limit."""

    status_code = 413
    code = "payload_too_large"


class ImageTooLarge(PayloadTooLarge):
    """An image or mask is over the byte or pixel limits."""


class RateLimited(OpenEditsError):
    """Too many requests for this token; says when to come back."""

    status_code = 429
    code = "too_many_requests"

    def __init__(
        self, message: str, *, retry_after: int = 1, headers: dict[str, str] | None = None
    ) -> None:
        merged = {"Retry-After": str(max(1, int(retry_after)))}
        merged.update(headers or {})
        super().__init__(message, headers=merged)
        self.retry_after = max(1, int(retry_after))


class QueueFull(RateLimited):
    """The task queue is at its configured bound."""


class EngineUnavailable(OpenEditsError):
    """The engine cannot run here: a missing extra, weights that do not load, no device."""


class EngineFailed(OpenEditsError):
    """The engine broke while editing (out of memory, bad weights, a bug)."""


class TaskCancelled(OpenEditsError):
    """The task was cancelled; raised inside workers and engines at a step boundary."""

    status_code = 409
    code = "cancelled"


class SyncTimeout(OpenEditsError):
    """A synchronous call ran past its deadline; the task goes on."""

    status_code = 504
    code = "timeout"
