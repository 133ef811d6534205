"""Per-token rate limits on `POST /midjourney/*`: a pure ASGI middleware over the `limits` library.

Each request to a limited path is counted against a key: a digest of its bearer token when the
token is valid, else the client's address, so a flood without a token, or with made-up ones,
is limited as well (and made-up tokens cannot mint fresh budgets). Every response on a limited
path carries

- `X-RateLimit-Limit`: how many requests the window allows,
- `X-RateLimit-Remaining`: how many are left in it now,
- `X-RateLimit-Reset`: the Unix time (seconds) at which the next request slot frees,

and a refused one is `429 too_many_requests` in the contract's envelope, with `Retry-After`.

The strategy is a *moving* window: no span of the window's length ever holds more than the limit.
A fixed window lets a client spend the limit twice around a boundary (60 at 0:59, 60 at 1:00),
which is exactly the burst a GPU queue cannot absorb; the moving window's cost, one timestamp per
counted request per key, is small at the limits this server uses, and its `Retry-After` is exact
(the moment the oldest counted request ages out), so a polite client never retries too early.

Counters live in `OPENEDITS_RATE_LIMIT_STORAGE_URL` (`memory://` by default; `redis://host:6379`
shares them between API processes with no other change).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from anyio import to_thread
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openedits.errors import OpenEditsError, RateLimited
from openedits.records import envelope
from openedits.settings import Settings

__all__ = ["LIMITED_PREFIX", "RateLimitMiddleware", "parse_rate_limit"]

log = logging.getLogger(__name__)

LIMITED_PREFIX = "/midjourney/"
"""`POST` requests under this prefix are counted; reads of files and health checks are not."""
READS_PATH = "/midjourney/tasks"
"""Polling is counted in a budget of its own (OPENEDITS_RATE_LIMIT_READS), so a client that
polls a long edit every second does not spend the budget its submits need."""

_OFF = frozenset({"", "0", "off", "none", "false", "disabled"})
_SETTING = "OPENEDITS_RATE_LIMIT"
# A valid token stays known this long, so the database is asked about it once a minute, not on
# every request. A token revoked meanwhile is still refused by the route's own authentication;
# only the bucket it is counted in lags.
_VALID_TOKEN_TTL = 60.0
_VALID_TOKEN_CACHE = 10_000
# A storage outage is logged at most this often, not once per request.
_OUTAGE_LOG_INTERVAL = 60.0

Authenticate = Callable[[str], bool]
"""Whether an `authorization` header value holds a valid token (may block: runs in a thread)."""


def parse_rate_limit(text: str) -> list[RateLimitItem]:
    """The limits `OPENEDITS_RATE_LIMIT` describes; `[]` when it turns limiting off.

    Accepts the `limits` notation (`60/minute`, `10 per second`, several joined by `;`), and `0`,
    `off`, `none`, `false`, `disabled` or nothing to disable. Raises ValueError with a message
    saying what to write instead.
    """
    cleaned = text.strip()
    if cleaned.lower() in _OFF:
        return []
    try:
        items = parse_many(cleaned)
    except ValueError:
        raise ValueError(
            f"{_SETTING}={text!r} is not a rate limit; write one such as 60/minute, "
            "10/second;300/hour, or 0 (or off) to disable rate limiting"
        ) from None
    if any(item.amount < 1 for item in items):
        raise ValueError(
            f"{_SETTING}={text!r} allows no request at all; write a positive amount such as "
            "60/minute, or 0 (or off) to disable rate limiting"
        )
    return items


def _header_map(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", [])}


def _app_authenticate(scope: Scope) -> Authenticate | None:
    """The wrapped app's own token check, found through `scope["app"]` (set by Starlette)."""
    app = scope.get("app")
    service = getattr(getattr(app, "state", None), "service", None)
    authenticator = getattr(service, "authenticator", None)
    if authenticator is None:
        return None

    def check(authorization: str) -> bool:
        try:
            authenticator.authenticate(authorization)
        except OpenEditsError:
            return False
        return True

    return check


@dataclass(frozen=True)
class _Verdict:
    """The outcome of counting one request: allowed or not, and what the headers say."""

    allowed: bool
    limit: RateLimitItem
    remaining: int
    reset_at: float  # Unix time at which the next slot frees

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-ratelimit-limit", str(self.limit.amount).encode()),
            (b"x-ratelimit-remaining", str(max(0, self.remaining)).encode()),
            (b"x-ratelimit-reset", str(math.ceil(self.reset_at)).encode()),
        ]


class RateLimitMiddleware:
    """Count `POST /midjourney/*` requests per token (or per address) and refuse the excess.

    Must sit inside `TraceMiddleware` (added before it), so the refusal's envelope and its
    `x-trace-id` header carry the request's trace id. `authenticate` decides whether a header's
    token is valid; by default the wrapped app's `state.service.authenticator` does.
    """

    def __init__(
        self, app: ASGIApp, settings: Settings, *, authenticate: Authenticate | None = None
    ) -> None:
        self.app = app
        self.setting = settings.rate_limit
        self.read_setting = settings.rate_limit_reads
        self.items = parse_rate_limit(settings.rate_limit)
        self.read_items = parse_rate_limit(settings.rate_limit_reads)
        self._authenticate = authenticate
        self._valid_tokens: dict[str, float] = {}
        self._last_outage_log = -math.inf
        self.limiter: MovingWindowRateLimiter | None = None
        self._inline = True
        if self.items or self.read_items:
            try:
                storage = storage_from_string(settings.rate_limit_storage_url)
            except Exception as exc:  # limits raises ConfigurationError, or a missing driver
                raise ValueError(
                    f"OPENEDITS_RATE_LIMIT_STORAGE_URL={settings.rate_limit_storage_url!r} cannot "
                    f"be used ({exc}); use memory:// or redis://host:6379 (redis needs "
                    "pip install 'openedits[scale]')"
                ) from None
            self.limiter = MovingWindowRateLimiter(storage)
            # The in-memory storage answers in microseconds; any other is a network round trip,
            # which must not stall the event loop, so it runs in a worker thread.
            self._inline = isinstance(storage, MemoryStorage)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.limiter is None
            or scope["type"] != "http"
            or scope.get("method") != "POST"
            or not str(scope.get("path", "")).startswith(LIMITED_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        reads = scope.get("path") == READS_PATH
        items = self.read_items if reads else self.items
        if not items:
            await self.app(scope, receive, send)
            return
        key, by_token = await self._key(scope)
        if reads:
            key = f"{key}:reads"
        try:
            if self._inline:
                verdict = self._count(key, items)
            else:
                verdict = await to_thread.run_sync(self._count, key, items)
        except Exception:
            # An abuse control that is down must not take the API down with it: let the
            # request through, and say so in the log (once a minute, not once a request).
            now = time.monotonic()
            if now - self._last_outage_log >= _OUTAGE_LOG_INTERVAL:
                self._last_outage_log = now
                log.warning("rate limit storage failed; requests pass unlimited", exc_info=True)
            await self.app(scope, receive, send)
            return
        if not verdict.allowed:
            await self._refuse(scope, send, verdict, by_token=by_token, reads=reads)
            return
        extra = verdict.headers()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _key(self, scope: Scope) -> tuple[str, bool]:
        """The bucket of this request, and whether it is a token's (else an address's)."""
        authorization = _header_map(scope).get(b"authorization", b"").decode("latin-1").strip()
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            # Only a digest is used as the key: raw tokens never reach the limits storage.
            digest = hashlib.sha256(token.encode()).hexdigest()[:32]
            if await self._is_valid(digest, authorization, scope):
                return f"openedits:token:{digest}", True
        client = scope.get("client")
        address = str(client[0]) if client else "unknown"
        return f"openedits:addr:{address}", False

    async def _is_valid(self, digest: str, authorization: str, scope: Scope) -> bool:
        now = time.monotonic()
        expires = self._valid_tokens.get(digest)
        if expires is not None and expires > now:
            return True
        check = self._authenticate or _app_authenticate(scope)
        if check is None:
            return False
        # A stored token is a database lookup: keep it off the event loop.
        valid = await to_thread.run_sync(check, authorization)
        if valid:
            if len(self._valid_tokens) >= _VALID_TOKEN_CACHE:
                self._valid_tokens.clear()
            self._valid_tokens[digest] = now + _VALID_TOKEN_TTL
        else:
            self._valid_tokens.pop(digest, None)
        return valid

    def _count(self, key: str, items: list[RateLimitItem]) -> _Verdict:
        """Hit every configured limit; the first one that is spent refuses the request."""
        assert self.limiter is not None
        tightest: _Verdict | None = None
        for item in items:
            allowed = self.limiter.hit(item, key)
            stats = self.limiter.get_window_stats(item, key)
            verdict = _Verdict(allowed, item, stats.remaining, stats.reset_time)
            if not allowed:
                return verdict
            if tightest is None or verdict.remaining < tightest.remaining:
                tightest = verdict
        assert tightest is not None
        return tightest

    async def _refuse(
        self, scope: Scope, send: Send, verdict: _Verdict, *, by_token: bool, reads: bool
    ) -> None:
        retry_after = max(1, math.ceil(verdict.reset_at - time.time()))
        who = (
            "this token"
            if by_token
            else "this client address (requests without a valid token are counted by address)"
        )
        error = RateLimited(
            f"rate limit reached: {who} may make {verdict.limit} POST requests to "
            f"{READS_PATH if reads else '/midjourney/*'}; retry in {retry_after} s "
            "(Retry-After). The server's operator can raise the limit with "
            + (f"{_SETTING}_READS (now {self.read_setting!r})" if reads
               else f"{_SETTING} (now {self.setting!r})"),
            retry_after=retry_after,
        )
        trace_id = str(scope.get("state", {}).get("trace_id", ""))
        body = json.dumps(envelope(error.code, error.message, trace_id)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *[(k.lower().encode(), v.encode()) for k, v in error.headers.items()],
            *verdict.headers(),
        ]
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
