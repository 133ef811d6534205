"""An owed callback survives `kill -9` of a real `openedits serve` and arrives after restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from standardwebhooks import Webhook

from tests.conftest import AUTH, TOKEN, data_uri

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from openedits.cli import main; main()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: IO[bytes]) -> None:
    deadline = time.time() + 30
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise TimeoutError("server did not become healthy")
        time.sleep(0.1)


@contextmanager
def _server(env: dict[str, str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`openedits serve` as an operator runs it, on `port`, until the block ends."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([*CLI, "serve", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            _wait_healthy(proc, port, log)
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


@contextmanager
def _receiver_at(port: int) -> Iterator[list[tuple[dict[str, str], bytes]]]:
    """A receiver on a chosen port (the callback_url was fixed before it came up)."""
    got: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            got.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield got
    finally:
        server.shutdown()
        server.server_close()


def _owed(db_url: str) -> list[dict[str, Any]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("select state, attempts from webhook_deliveries"))
            return [dict(r._mapping) for r in rows]
    finally:
        engine.dispose()


@pytest.mark.slow
def test_owed_callback_survives_kill_9_and_restart(tmp_path: Path, image, mask) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENEDITS_")}
    env.update({
        "OPENEDITS_DATA_DIR": str(data),
        "OPENEDITS_API_TOKENS": TOKEN,
        "OPENEDITS_ALLOW_PRIVATE_URLS": "true",
        "OPENEDITS_ENGINE": "opencv",
        # Short waits, and enough of them that the schedule outlasts the restart.
        "OPENEDITS_WEBHOOK_RETRY_DELAYS": ",".join(["0.3s"] * 200),
        "OPENEDITS_WEBHOOK_TIMEOUT_SECONDS": "1",
        "OPENEDITS_WEBHOOK_POLL_SECONDS": "0.2",
        "OPENEDITS_LOG_LEVEL": "WARNING",
    })
    db_url = f"sqlite:///{data / 'openedits.db'}"
    receiver_port = _free_port()
    callback_url = f"http://127.0.0.1:{receiver_port}/hook"

    with _server(env, _free_port()) as proc:
        base = f"http://127.0.0.1:{proc.args[-1]}"  # type: ignore[index]
        r = httpx.post(base + "/midjourney/edits", headers=AUTH, timeout=10, json={
            "image_url": data_uri(image), "mask": data_uri(mask), "prompt": "x",
            "callback_url": callback_url})
        assert r.status_code == 200, r.text
        task_id = r.json()["task_id"]
        deadline = time.time() + 20
        while True:
            record = httpx.post(base + "/midjourney/tasks", headers=AUTH, json={"id": task_id},
                                timeout=5).json()
            owed = _owed(db_url)
            # Finished, and the receiver (still down) has already been tried at least once.
            if record.get("state") == "succeeded" and owed and owed[0]["attempts"] >= 1:
                break
            assert time.time() < deadline, (record, owed)
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert _owed(db_url)[0]["state"] == "pending"

    with _receiver_at(receiver_port) as got, _server(env, _free_port()):
        deadline = time.time() + 20
        while not got and time.time() < deadline:
            time.sleep(0.05)
        assert got, "the owed callback never arrived after the restart"
        time.sleep(0.3)  # one retry delay: a delivered callback is not sent again
    assert len(got) == 1
    assert _owed(db_url)[0]["state"] == "delivered"

    # The generated secret was kept across the restart; the operator can print it.
    printed = subprocess.run([*CLI, "webhook-secret"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60, check=True)
    secret = printed.stdout.strip()
    headers, body = got[0]
    payload = Webhook(secret).verify(body, headers)
    assert payload["task_id"] == task_id and payload["success"] is True
    assert json.loads(body)["image_url"].endswith(f"/files/{task_id}/grid.png")
