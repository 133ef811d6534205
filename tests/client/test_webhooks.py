"""verify_webhook: Standard Webhooks signatures as openedits sends them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import queue
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from openedits.client import Client, WebhookVerificationError, verify_webhook
from tests.client.client_support import TOKEN, mask_bytes, png_bytes, serve

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


# --- end to end: a real callback from the served app -------------------------------------------


class Receiver(ThreadingHTTPServer):
    """A loopback endpoint that records each POST (headers, raw body) and answers 204."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                outer.received.put(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output clean

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_real_callback_verifies_and_a_forged_one_does_not(
    receiver: Receiver, tmp_path: Path
) -> None:
    with serve(tmp_path / "data", webhook_secret=SECRET, webhook_poll_seconds=0.05) as live:
        with Client(base_url=live.url, token=TOKEN) as client:
            task_id = client.submit(png_bytes(), "x", mask=mask_bytes(), callback_url=receiver.url)
        final = None
        deadline = time.monotonic() + 60
        while final is None:
            headers, raw = receiver.received.get(timeout=max(0.1, deadline - time.monotonic()))
            body = verify_webhook(raw, headers, SECRET)
            assert body["task_id"] == task_id
            if body.get("success") is True and body.get("image_url"):
                final = (headers, raw, body)
        headers, raw, body = final
        assert body["progress"] == 100 and body["image_url"].endswith("/grid.png")
        with pytest.raises(WebhookVerificationError):
            verify_webhook(raw.replace(b"grid.png", b"evil.png"), headers, SECRET)
