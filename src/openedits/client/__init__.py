"""The Python SDK for openedits (and the hosted Midjourney Edits API it mirrors).

::

    from openedits.client import Client

    with Client(base_url="http://127.0.0.1:8000", token="…") as client:
        result = client.edit(image="photo.png", mask="mask.png", prompt="a red hat")
        result.save("out/")

`AsyncClient` has the same methods, awaited. Errors form one tree under `OpenEditsClientError`
(see `_exceptions`). `verify_webhook` checks a signed callback.
"""

from ._async_client import AsyncClient
from ._client import Client
from ._exceptions import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    NotImplementedOnServerError,
    OpenEditsClientError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TaskCancelledError,
    TaskFailedError,
    TokenMismatchedError,
    WaitTimeoutError,
    WebhookVerificationError,
)
from ._models import EditResult, TaskPage, TaskRecord, TaskStatus
from ._sources import ImageSource, to_image_url
from ._webhooks import verify_webhook

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "EditResult",
    "ImageSource",
    "NotFoundError",
    "NotImplementedOnServerError",
    "OpenEditsClientError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskPage",
    "TaskRecord",
    "TaskStatus",
    "TokenMismatchedError",
    "WaitTimeoutError",
    "WebhookVerificationError",
    "to_image_url",
    "verify_webhook",
]
