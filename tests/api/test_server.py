"""The HTTP server under hostile connections: deadlines for heads and bodies, a connection cap.

Each test runs the real server configuration (`server_config`, what `openedits serve` runs) in a
thread on a loopback port, with a small cap and short deadlines so the bounds are reached fast.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from openedits.api.app import create_app
from openedits.api.server import MAX_HEAD_BYTES, raise_open_file_limit, server_config
from openedits.settings import Settings
from tests.conftest import AUTH, data_uri
from tests.fakes import FakeEngine
from tests.servers import fake_engine_server, free_port, serve_config_in_thread

pytestmark = pytest.mark.timeout(60)

CAP = 50
HEAD_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
SLACK = 3.0  # scheduling allowance on a loaded 2-core machine, on top of a deadline


@contextmanager
def guarded_server(settings: Settings) -> Iterator[str]:
    settings = settings.model_copy(update={
        "max_connections": CAP, "header_timeout_seconds": HEAD_TIMEOUT,
        "body_timeout_seconds": BODY_TIMEOUT, "rate_limit": "off"})
    app = create_app(settings, engine=FakeEngine())
    config = server_config(app, settings, host="127.0.0.1", port=free_port(),
                           log_level="warning")
    with serve_config_in_thread(config) as url:
        yield url


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes `sock` (EOF or reset) within `within` seconds."""
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_a_flood_of_unfinished_connections_is_closed_and_others_are_served(
        settings: Settings, image, mask) -> None:
    with guarded_server(settings) as url, ExitStack() as stack, \
            httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200  # connected before the flood
        flood = []
        for i in range(200):
            sock = stack.enter_context(_connect(url))
            if i % 2:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127")  # half a header line
            flood.append(sock)
        opened = time.monotonic()

        # A client connected before the flood keeps being served, edits included.
        assert client.get("/healthz").status_code == 200
        r = client.post("/midjourney/edits", headers=AUTH, json={
            "image_url": data_uri(image), "mask": data_uri(mask), "prompt": "x"})
        assert r.status_code == 200, r.text

        # A new connection past the cap is refused at once, in the envelope, with Retry-After.
        with httpx.Client(base_url=url, timeout=5) as late:
            refused = late.get("/healthz")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "server_busy"
        assert "OPENEDITS_MAX_CONNECTIONS" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["trace_id"] == refused.headers["x-trace-id"]

        # Every socket of the flood is closed by the server within the head deadline.
        still_open = [s for s in flood
                      if not _closed_by_server(s, max(0.01, opened + HEAD_TIMEOUT + SLACK
                                                      - time.monotonic()))]
        assert not still_open, f"{len(still_open)} of 200 idle sockets are still open"

        # Once they are gone, new clients are served again.
        with httpx.Client(base_url=url, timeout=10) as fresh:
            assert fresh.get("/healthz").status_code == 200
            r = fresh.post("/midjourney/edits", headers=AUTH, json={
                "image_url": data_uri(image), "mask": data_uri(mask), "prompt": "x"})
            assert r.status_code == 200, r.text


def test_a_head_trickled_byte_by_byte_is_closed_at_the_deadline(settings: Settings) -> None:
    with guarded_server(settings) as url, _connect(url) as sock:
        started = time.monotonic()
        sock.settimeout(0.3)
        closed = False
        for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
            if time.monotonic() - started > HEAD_TIMEOUT + SLACK:
                break
        assert closed, "a trickled head kept its connection past the head deadline"


def test_an_idle_keep_alive_connection_is_closed(settings: Settings) -> None:
    with guarded_server(settings) as url, _connect(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        # uvicorn's keep-alive timer is cancelled by any byte; the head deadline is not.
        sock.sendall(b"G")
        assert _closed_by_server(sock, HEAD_TIMEOUT + SLACK)


def test_an_oversized_head_is_refused(settings: Settings) -> None:
    with guarded_server(settings) as url, _connect(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        try:
            for _ in range(MAX_HEAD_BYTES // 1000 + 10):
                sock.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
        except (ConnectionResetError, BrokenPipeError):
            pass
        sock.settimeout(5)
        try:
            reply = sock.recv(65536)
        except ConnectionResetError:
            reply = b""
        assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply[:200]
        assert _closed_by_server(sock, SLACK)


def test_a_stalled_body_is_closed_and_logged_as_the_client_s_doing(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with guarded_server(settings) as url, _connect(url) as sock:
        sock.sendall(b"POST /midjourney/edits HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"authorization: Bearer test-token\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{\"prompt\": ")
        assert _closed_by_server(sock, BODY_TIMEOUT + SLACK)
        time.sleep(0.5)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_serve_raises_the_open_file_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        now = raise_open_file_limit()
        assert now == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert now == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_cap_leaves_descriptors_for_the_rest(settings: Settings) -> None:
    config = server_config(object(), settings.model_copy(update={"max_connections": 5000}),
                           host="127.0.0.1", port=1, open_files=1024)
    assert config.http.limits.max_connections < 1024  # type: ignore[union-attr]


LIVENESS_BOUND = 1.0
"""A liveness probe's usual timeout: /healthz must answer inside it whatever the load. This is a
bound on behaviour (a probe that times out restarts a healthy server), not a speed goal."""


@pytest.mark.slow
def test_healthz_answers_within_a_probe_timeout_while_submits_wait_for_the_store(
        tmp_path, image) -> None:
    import sqlite3
    from concurrent.futures import ThreadPoolExecutor

    env = {"OPENEDITS_DATA_DIR": str(tmp_path), "OPENEDITS_API_TOKENS": "test-token",
           "OPENEDITS_RATE_LIMIT": "off", "OPENEDITS_QUEUE_MAX": "10000"}
    body = {"image_url": data_uri(image), "prompt": "x", "async": True}
    with fake_engine_server(env, step_seconds=0.01) as server, \
            httpx.Client(base_url=server.url, timeout=60,
                         limits=httpx.Limits(max_connections=200)) as client, \
            httpx.Client(base_url=server.url, timeout=30) as probe, \
            ThreadPoolExecutor(100) as pool:
        # A long write holds the store (as a burst of large submits does): every submit's
        # thread waits for it, and the request thread pool is soon all waiting.
        lock = sqlite3.connect(tmp_path / "openedits.db", timeout=10, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            submits = [pool.submit(client.post, "/midjourney/edits", headers=AUTH, json=body)
                       for _ in range(100)]
            latencies = []
            until = time.monotonic() + 3.0
            while time.monotonic() < until:
                started = time.monotonic()
                r = probe.get("/healthz")
                latencies.append(time.monotonic() - started)
                assert r.status_code == 200, r.text
                time.sleep(0.05)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        for f in submits:
            f.result()  # answered, whatever the status (the store's own limits are not tested here)
    assert max(latencies) < LIVENESS_BOUND, sorted(latencies)[-5:]
