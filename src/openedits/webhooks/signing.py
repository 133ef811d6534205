"""Standard Webhooks signing of callbacks: webhook-id, webhook-timestamp, webhook-signature."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from standardwebhooks import Webhook

__all__ = ["Signer"]


class Signer:
    """Signs callback bodies with the server's `whsec_` secret, through the `standardwebhooks`
    library itself, so receivers verify with any Standard Webhooks implementation."""

    def __init__(self, secret: str) -> None:
        try:
            self._webhook = Webhook(secret)
        except Exception as exc:
            # The library wants base64 after the `whsec_` prefix; say what to set instead.
            raise ValueError(
                "OPENEDITS_WEBHOOK_SECRET is not a Standard Webhooks secret ('whsec_' followed "
                f"by base64) ({type(exc).__name__}); unset it to have one generated, or see "
                "`openedits webhook-secret`"
            ) from None

    def headers(self, message_id: str, body: str, timestamp: float) -> dict[str, str]:
        """The headers of one POST of `body` (the exact text sent) at `timestamp` (Unix s)."""
        seconds = math.floor(timestamp)
        signature = self._webhook.sign(
            msg_id=message_id, timestamp=datetime.fromtimestamp(seconds, tz=UTC), data=body
        )
        return {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(seconds),
            "webhook-signature": signature,
        }
