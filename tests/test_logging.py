"""Every log line about a task carries its task_id and trace_id."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
from datetime import datetime

import httpx
import pytest
from fastapi.testclient import TestClient

from openedits._logging import FORMAT, ContextFilter, JsonFormatter, bind
from tests.conftest import AUTH, data_uri
from tests.servers import ServerProcess, free_port


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[logging.LogRecord, str]] = []
        self.addFilter(ContextFilter())
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record, self.format(record)))


@pytest.fixture
def collected() -> Collect:
    handler = Collect()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_level)


def test_task_lines_carry_both_ids(client: TestClient, image, collected: Collect) -> None:
    r = client.post("/midjourney/edits", headers=AUTH,
                    json={"image_url": data_uri(image), "prompt": "x"})
    task_id, trace_id = r.json()["task_id"], r.headers["x-trace-id"]
    runner_lines = [text for rec, text in collected.lines
                    if rec.name == "openedits.workers.runner"]
    assert any("task started" in t for t in runner_lines)
    assert any("task succeeded" in t for t in runner_lines)
    for text in runner_lines:
        assert f"task_id={task_id}" in text and f"trace_id={trace_id}" in text


def test_bind_nests_and_resets(collected: Collect) -> None:
    log = logging.getLogger("openedits.test")
    with bind(task_id="t1", trace_id="r1"):
        log.info("inside")
    log.info("outside")
    assert collected.lines[0][1].endswith("inside [task_id=t1 trace_id=r1]")
    assert collected.lines[1][1].endswith("outside")


def test_json_lines_carry_the_fields(collected: Collect) -> None:
    formatter = JsonFormatter()
    log = logging.getLogger("openedits.test")
    with bind(task_id="t1", trace_id="r1"):
        log.info("edited %dx%d", 4, 2)
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("it broke")
    logging.getLogger("openedits.access").info(
        "GET /x 200", extra={"method": "GET", "path": "/x", "status": 200, "duration_ms": 1.5})
    lines = [formatter.format(rec) for rec, _ in collected.lines]
    assert all("\n" not in line for line in lines)
    first, broke, access = (json.loads(line) for line in lines)
    assert first["message"] == "edited 4x2" and first["level"] == "INFO"
    assert (first["logger"], first["task_id"], first["trace_id"]) == ("openedits.test", "t1", "r1")
    assert datetime.fromisoformat(first["time"]).tzinfo is not None
    assert "ValueError: boom" in broke["exc_info"] and broke["level"] == "ERROR"
    assert {k: access[k] for k in ("method", "path", "status", "duration_ms")} == {
        "method": "GET", "path": "/x", "status": 200, "duration_ms": 1.5}
    assert access["task_id"] is None


def _serve_output(tmp_path, image, mask, log_format: str | None) -> str:
    port = free_port()
    env = {"OPENEDITS_DATA_DIR": str(tmp_path), "OPENEDITS_API_TOKENS": "tok",
           "OPENEDITS_ENGINE": "opencv"}
    if log_format:
        env["OPENEDITS_LOG_FORMAT"] = log_format
    argv = [sys.executable, "-c", "from openedits.cli import main; main()", "serve",
            "--port", str(port)]
    server = ServerProcess(env, port, argv)
    try:
        server.wait_healthy()
        r = httpx.post(server.url + "/midjourney/edits", timeout=60,
                       headers={"authorization": "Bearer tok"},
                       json={"image_url": data_uri(image), "mask": data_uri(mask),
                             "prompt": "remove it"})
        assert r.status_code == 200, r.text
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        return server.output()
    finally:
        server.stop()


@pytest.mark.slow
def test_serve_writes_json_lines_uvicorn_included(tmp_path, image, mask) -> None:
    out = _serve_output(tmp_path, image, mask, "json")
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert {"time", "level", "logger", "message", "trace_id", "task_id"} <= set(entries[0])
    loggers = {e["logger"] for e in entries}
    assert "uvicorn.error" in loggers  # "Started server process", "Application startup…"
    edits = [e for e in entries if e["logger"] == "openedits.access"
             and e["path"] == "/midjourney/edits"]
    assert len(edits) == 1 and edits[0]["method"] == "POST" and edits[0]["status"] == 200
    assert edits[0]["duration_ms"] > 0 and edits[0]["trace_id"]
    runner = [e for e in entries if e["logger"] == "openedits.workers.runner"]
    assert runner and all(e["task_id"] and e["trace_id"] for e in runner)


@pytest.mark.slow
def test_serve_writes_readable_text_by_default(tmp_path, image, mask) -> None:
    out = _serve_output(tmp_path, image, mask, None)
    assert not out.lstrip().startswith("{")
    assert re.search(r"INFO openedits\.access: POST /midjourney/edits 200 [\d.]+ ms", out), out
    assert "INFO uvicorn.error: Started server process" in out
