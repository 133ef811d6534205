"""verify_webhook: Standard Webhooks signatures as openedits sends them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest

from openedits.client import WebhookVerificationError, verify_webhook

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
BODY = json.dumps({"success": True, "task_id": "t1", "progress": 100}).encode()


def signed(
    body: bytes = BODY, *, secret: str = SECRET, msg_id: str = "msg_1", timestamp: int | None = None
) -> dict[str, str]:
    """Headers computed by hand from the spec, not by the library under test."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": ts,
        "webhook-signature": "v1," + base64.b64encode(mac).decode(),
    }


def test_a_good_signature_returns_the_body() -> None:
    assert verify_webhook(BODY, signed(), SECRET) == json.loads(BODY)
    # Any header case, a str payload, and several signatures (key rotation) all verify.
    headers = {k.title(): v for k, v in signed().items()}
    headers["Webhook-Signature"] = "v1,bm9wZQ== " + headers["Webhook-Signature"]
    assert verify_webhook(BODY.decode(), headers, SECRET)["task_id"] == "t1"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h: {**h, "webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()},
        lambda h: {**h, "webhook-id": "msg_2"},
        lambda h: {k: v for k, v in h.items() if k != "webhook-timestamp"},
        lambda h: {**h, "webhook-signature": "garbage"},
        lambda h: {**h, "webhook-timestamp": "yesterday"},
    ],
    ids=["wrong-mac", "other-id", "no-timestamp", "malformed-signature", "bad-timestamp"],
)
def test_tampered_headers_are_refused(tamper: object) -> None:
    with pytest.raises(WebhookVerificationError):
        verify_webhook(BODY, tamper(signed()), SECRET)  # type: ignore[operator]


def test_a_changed_body_or_another_secret_is_refused() -> None:
    headers = signed()
    with pytest.raises(WebhookVerificationError, match="does not verify"):
        verify_webhook(BODY.replace(b"t1", b"t2"), headers, SECRET)
    other = "whsec_" + base64.b64encode(b"another secret of 32 bytes......").decode()
    with pytest.raises(WebhookVerificationError):
        verify_webhook(BODY, headers, other)


def test_a_replayed_old_delivery_is_refused() -> None:
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify_webhook(BODY, signed(timestamp=int(time.time()) - 3600), SECRET)


def test_a_non_object_body_and_an_empty_secret_are_refused() -> None:
    with pytest.raises(WebhookVerificationError, match="not a JSON object"):
        verify_webhook(b"[1]", signed(b"[1]"), SECRET)
    with pytest.raises(WebhookVerificationError, match="secret"):
        verify_webhook(BODY, signed(), "whsec_")
