"""A sync caller that hangs up stops being waited for; its task goes on and ends."""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from openedits.api.app import create_app
from openedits.settings import Settings
from tests.conftest import AUTH, data_uri
from tests.fakes import FakeEngine
from tests.servers import serve_in_thread


def test_a_hung_up_sync_call_stops_waiting_and_the_task_still_ends(settings: Settings,
                                                                  image) -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    app = create_app(settings, engine=engine)
    bus = app.state.runtime.bus
    with serve_in_thread(app) as url:
        body = {"image_url": data_uri(image), "prompt": "x"}
        # The client gives up long before the task can end (the engine is held).
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/midjourney/edits", headers=AUTH, json=body, timeout=1.0)
        assert engine.started.is_set()
        deadline = time.time() + 5
        while bus._watches and time.time() < deadline:
            time.sleep(0.05)
        assert not bus._watches, "the server still waits for a caller that left"
        engine.gate.set()
        deadline = time.time() + 10
        while time.time() < deadline:
            batch = httpx.post(url + "/midjourney/tasks", headers=AUTH,
                               json={"action": "retrieve_batch"}).json()
            if batch["items"] and batch["items"][0]["state"] == "succeeded":
                break
            time.sleep(0.05)
        assert batch["items"][0]["state"] == "succeeded"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def log_records() -> Iterator[_Records]:
    """Every log record, uvicorn's own included (its loggers do not propagate to the root)."""
    handler = _Records()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn"),
               logging.getLogger("uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    ours = logging.getLogger("openedits")
    level = ours.level
    ours.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        ours.setLevel(level)
        for logger in loggers:
            logger.removeHandler(handler)


def _hang_up(sock: socket.socket) -> None:
    # Close with a reset, as a killed client or a dropped network does.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _errors(handler: _Records) -> list[str]:
    time.sleep(0.5)  # the server notices the hang-up asynchronously
    return [f"{r.name}: {r.getMessage()} {r.exc_info and r.exc_info[0]}"
            for r in handler.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_client_hanging_up_mid_body_is_not_logged_as_an_error(
        settings: Settings, log_records: _Records) -> None:
    app = create_app(settings, engine=FakeEngine())
    with serve_in_thread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        for _ in range(3):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /midjourney/edits HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"authorization: Bearer test-token\r\ncontent-type: application/json\r\n"
                         b"content-length: 100000\r\n\r\n{\"prompt\": \"" + b"x" * 5000)
            time.sleep(0.2)
            _hang_up(sock)
        assert httpx.get(url + "/healthz").status_code == 200
    assert not _errors(log_records)
    assert any("hung up" in r.getMessage() and r.levelno == logging.INFO
               for r in log_records.records)


def test_a_client_hanging_up_while_a_file_streams_is_not_logged_as_an_error(
        settings: Settings, log_records: _Records) -> None:
    app = create_app(settings, engine=FakeEngine())
    task_id = str(uuid.uuid4())
    app.state.runtime.blobs.put(f"{task_id}/grid.png", os.urandom(30_000_000), "image/png")
    with serve_in_thread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        for _ in range(3):
            sock = socket.create_connection((host, int(port)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(f"GET /files/{task_id}/grid.png HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                         .encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(0.2)
            _hang_up(sock)
        assert httpx.get(url + "/healthz").status_code == 200
    assert not _errors(log_records)
