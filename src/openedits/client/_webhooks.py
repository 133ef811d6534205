"""Verify a signed callback from openedits (Standard Webhooks) before trusting its body."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as _LibraryVerificationError

from ._exceptions import WebhookVerificationError

__all__ = ["verify_webhook"]


def verify_webhook(
    payload: bytes | str, headers: Mapping[str, str], secret: str | bytes
) -> dict[str, Any]:
    """The callback's JSON body, once its `webhook-signature` verifies; else raises.

    `payload` must be the raw request body exactly as received (re-serialised JSON changes the
    bytes and fails the check); `headers` any mapping holding `webhook-id`,
    `webhook-timestamp` and `webhook-signature` (any case); `secret` the server's `whsec_…`
    secret. A timestamp more than five minutes off is refused, which stops replays. Use
    `webhook-id` to drop a delivery you already handled: retries keep the same id.

    Raises `WebhookVerificationError` for a missing header, a bad or stale signature, a secret
    that is not `whsec_` base64, or a body that is not a JSON object.
    """
    # The library wants a plain dict; starlette/httpx Headers and multidicts are Mappings.
    plain = {str(key).lower(): str(value) for key, value in headers.items()}
    try:
        verifier = Webhook(secret)
    except Exception as exc:  # the library raises bare errors for a malformed secret
        raise WebhookVerificationError(f"the webhook secret is not usable: {exc}") from exc
    try:
        body = verifier.verify(payload, plain)
    except _LibraryVerificationError as exc:
        raise WebhookVerificationError(f"callback signature does not verify: {exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        # A malformed signature header ("v1" without a comma, bad base64) or a body that is
        # not UTF-8 JSON surfaces as a ValueError from inside the library.
        raise WebhookVerificationError(f"callback is malformed: {exc}") from exc
    if not isinstance(body, dict):
        raise WebhookVerificationError("callback body is not a JSON object")
    return body
