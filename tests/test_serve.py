"""`openedits serve` as a person runs it: a real process, its first-run token, a real edit."""

from __future__ import annotations

import re
import sys
import time

import httpx
import pytest

from tests.conftest import data_uri
from tests.servers import ServerProcess, free_port

pytestmark = pytest.mark.slow


def test_first_start_prints_a_token_that_works(tmp_path, image, mask) -> None:
    port = free_port()
    env = {"OPENEDITS_DATA_DIR": str(tmp_path), "OPENEDITS_LOG_LEVEL": "WARNING"}
    argv = [sys.executable, "-c", "from openedits.cli import main; main()", "serve",
            "--port", str(port)]
    server = ServerProcess(env, port, argv)
    try:
        server.wait_healthy()
        deadline = time.time() + 5
        found = None
        while not found and time.time() < deadline:
            found = re.search(r"oe_[\w-]{20,}", server.output())
            time.sleep(0.1)
        assert found, server.output()
        headers = {"authorization": f"Bearer {found.group(0)}"}
        health = httpx.get(server.url + "/healthz").json()
        assert health["engine"]["name"] == "opencv"
        r = httpx.post(server.url + "/midjourney/edits", headers=headers, timeout=60, json={
            "image_url": data_uri(image), "mask": data_uri(mask), "prompt": "remove it",
            "split_images": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["image_url"].startswith(server.url + "/files/")
        grid = httpx.get(body["image_url"])
        assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    finally:
        server.stop()
    # A second start finds the token and prints none.
    server = ServerProcess(env, port, argv)
    try:
        server.wait_healthy()
        assert "oe_" not in server.output()
    finally:
        server.stop()
