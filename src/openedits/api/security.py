"""Response headers that keep browsers from misusing what the server sends (framing, sniffing)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["PAGE_CSP", "SecurityHeadersMiddleware"]

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    # Images the user opens by URL or from disk, and results on a public URL or object store.
    "img-src 'self' data: blob: https: http:; connect-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
"""The playground keeps a token in localStorage: no inline or foreign script may run there."""

_EVERYWHERE = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


def _is_page(path: str) -> bool:
    return path == "/" or path.startswith("/web/")


class SecurityHeadersMiddleware:
    """nosniff, no framing and no referrer on every response; a strict CSP on the page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = list(_EVERYWHERE)
        if _is_page(str(scope.get("path", ""))):
            extra.append((b"content-security-policy", PAGE_CSP.encode()))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                headers = [*message.get("headers", []),
                           *[(k, v) for k, v in extra if k not in present]]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
