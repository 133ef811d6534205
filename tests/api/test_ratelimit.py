"""Rate limits on POST /midjourney/*: per token, per address without one, headers and envelope."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from openedits.api.app import create_app
from openedits.api.ratelimit import RateLimitMiddleware, parse_rate_limit
from openedits.settings import Settings
from openedits.store.tokens import TokenStore
from tests.conftest import AUTH, TOKEN
from tests.fakes import FakeEngine

RETRIEVE = {"action": "retrieve", "id": "no-such-task"}


def _settings(tmp_path: Path, rate_limit: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", api_tokens=TOKEN, allow_private_urls=True,
                    rate_limit=rate_limit, rate_limit_reads=rate_limit)


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Any]:
    clients: list[TestClient] = []

    def make(rate_limit: str) -> TestClient:
        app = create_app(_settings(tmp_path, rate_limit), engine=FakeEngine())
        tc = TestClient(app, raise_server_exceptions=False)
        tc.__enter__()
        clients.append(tc)
        return tc

    yield make
    for tc in clients:
        tc.__exit__(None, None, None)


def _post(tc: TestClient, headers: dict[str, str] | None = None) -> httpx.Response:
    return tc.post("/midjourney/tasks", headers=AUTH if headers is None else headers,
                   json=RETRIEVE)


def _check_refusal(r: httpx.Response, limit: int) -> dict[str, Any]:
    assert r.status_code == 429, r.text
    body = r.json()
    assert body["success"] is False
    assert body["error"]["code"] == "too_many_requests"
    # The trace middleware sits outside the limiter: the refusal carries the request's trace id.
    assert body["trace_id"] and body["trace_id"] == r.headers["x-trace-id"]
    assert r.headers["x-ratelimit-limit"] == str(limit)
    assert r.headers["x-ratelimit-remaining"] == "0"
    retry_after = int(r.headers["retry-after"])
    assert retry_after >= 1
    reset = int(r.headers["x-ratelimit-reset"])
    assert time.time() - 1 <= reset <= time.time() + retry_after + 1
    return body


def test_the_limit_trips_at_n_plus_one_with_envelope_and_headers(make_client: Any) -> None:
    tc = make_client("3/minute")
    for remaining in (2, 1, 0):
        r = _post(tc)
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-limit"] == "3"
        assert r.headers["x-ratelimit-remaining"] == str(remaining)
        assert int(r.headers["x-ratelimit-reset"]) >= int(time.time())
    body = _check_refusal(_post(tc), 3)
    message = body["error"]["message"]
    # The message teaches: the limit, when to retry, and which setting raises it.
    assert "3 per 1 minute" in message
    assert "retry in" in message
    assert "OPENEDITS_RATE_LIMIT_READS" in message and "'3/minute'" in message
    assert 1 <= int(_post(tc).headers["retry-after"]) <= 60


def test_edits_count_and_carry_the_headers_too(make_client: Any) -> None:
    tc = make_client("1/minute")
    r = tc.post("/midjourney/edits", headers=AUTH, json={"prompt": "x"})
    assert r.status_code == 400  # counted even though it was refused later, by validation
    assert r.headers["x-ratelimit-remaining"] == "0"
    refused = _check_refusal(tc.post("/midjourney/edits", headers=AUTH, json={"prompt": "x"}), 1)
    assert "OPENEDITS_RATE_LIMIT (now '1/minute')" in refused["error"]["message"]
    # Polling has a budget of its own: spent submits do not stop a client reading its tasks.
    assert _post(tc).status_code == 200
    _check_refusal(_post(tc), 1)


def test_tokens_are_independent(make_client: Any) -> None:
    tc = make_client("2/minute")
    store: TokenStore = tc.app.state.runtime.tokens
    other, _ = store.create("other", ["tasks"])
    other_auth = {"authorization": f"Bearer {other}"}
    assert [_post(tc).status_code for _ in range(2)] == [200, 200]
    _check_refusal(_post(tc), 2)
    r = _post(tc, other_auth)
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining"] == "1"
    assert _post(tc, other_auth).status_code == 200
    _check_refusal(_post(tc, other_auth), 2)


@pytest.mark.timeout(30)
def test_the_window_moves_on(make_client: Any) -> None:
    tc = make_client("2/second")
    assert [_post(tc).status_code for _ in range(2)] == [200, 200]
    refused = _check_refusal(_post(tc), 2)
    assert "2 per 1 second" in refused["error"]["message"]
    time.sleep(1.2)
    r = _post(tc)
    assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-remaining"] == "1"


def test_invalid_tokens_are_counted_by_address(make_client: Any) -> None:
    tc = make_client("2/minute")
    # Made-up tokens must not each get a fresh budget: they share the address's.
    for i in range(2):
        r = _post(tc, {"authorization": f"Bearer made-up-{i}"})
        assert r.status_code == 401, r.text
        assert r.headers["x-ratelimit-remaining"] == str(1 - i)
    body = _check_refusal(_post(tc, {"authorization": "Bearer made-up-3"}), 2)
    assert "client address" in body["error"]["message"]
    _check_refusal(_post(tc, {}), 2)  # no token at all: the same address bucket
    _check_refusal(_post(tc, {"authorization": "Basic dGVzdDp0ZXN0"}), 2)
    # A valid token from that same address still has its own budget.
    assert _post(tc).status_code == 200


def test_reads_and_other_paths_are_not_limited(make_client: Any) -> None:
    tc = make_client("1/minute")
    for _ in range(3):
        r = tc.get("/healthz")
        assert r.status_code == 200 and "x-ratelimit-limit" not in r.headers
        assert tc.get("/midjourney/edits", headers=AUTH).status_code == 405
    assert _post(tc).status_code == 200


@pytest.mark.parametrize("off", ["0", "off", "OFF", " none ", "false", ""])
def test_the_limit_can_be_turned_off(make_client: Any, off: str) -> None:
    tc = make_client(off)
    for _ in range(5):
        r = _post(tc)
        assert r.status_code == 200 and "x-ratelimit-limit" not in r.headers


def test_parse_rate_limit() -> None:
    assert [str(i) for i in parse_rate_limit("60/minute")] == ["60 per 1 minute"]
    assert [i.amount for i in parse_rate_limit("10/second;300/hour")] == [10, 300]
    assert parse_rate_limit("off") == []
    for bad in ("lots", "60/fortnight", "0/minute"):
        with pytest.raises(ValueError, match="OPENEDITS_RATE_LIMIT") as info:
            parse_rate_limit(bad)
        assert "60/minute" in str(info.value)


def test_an_unusable_storage_url_is_refused_with_a_hint(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, rate_limit_storage_url="nosuch://host")
    with pytest.raises(ValueError, match="OPENEDITS_RATE_LIMIT_STORAGE_URL"):
        RateLimitMiddleware(_echo_app, settings)


# --- the middleware alone, on raw ASGI scopes


async def _echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _call(mw: RateLimitMiddleware, *, client: str, token: str | None = None) -> tuple[int, dict]:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    scope = {"type": "http", "method": "POST", "path": "/midjourney/edits", "headers": headers,
             "client": (client, 1234), "state": {"trace_id": "t-1"}}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(mw(scope, receive, send))
    start = sent[0]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}


def test_addresses_are_independent_and_tokens_are_hashed(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, rate_limit="1/minute")
    seen: list[str] = []

    def authenticate(header: str) -> bool:
        seen.append(header)
        return header == "Bearer good"

    mw = RateLimitMiddleware(_echo_app, settings, authenticate=authenticate)
    assert _call(mw, client="203.0.113.1")[0] == 200
    assert _call(mw, client="203.0.113.1")[0] == 429
    assert _call(mw, client="203.0.113.2")[0] == 200
    assert _call(mw, client="203.0.113.1", token="good")[0] == 200
    assert _call(mw, client="203.0.113.9", token="good")[0] == 429  # the token's, any address
    # A valid token is checked once, then remembered for a while (no lookup per request).
    assert seen == ["Bearer good"]
    assert mw.limiter is not None
    keys = list(mw.limiter.storage.events)  # type: ignore[union-attr]
    assert not any("good" in k for k in keys)


def test_a_storage_outage_lets_requests_through(tmp_path: Path, caplog: Any) -> None:
    mw = RateLimitMiddleware(_echo_app, Settings(data_dir=tmp_path, rate_limit="1/minute"))
    assert mw.limiter is not None

    def broken(*args: Any, **kwargs: Any) -> bool:
        raise ConnectionError("redis is down")

    mw.limiter.hit = broken  # type: ignore[method-assign]
    statuses = [_call(mw, client="203.0.113.1")[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    outage_logs = [r for r in caplog.records if "rate limit storage failed" in r.message]
    assert len(outage_logs) == 1
