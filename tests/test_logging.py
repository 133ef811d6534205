"""Every log line about a task carries its task_id and trace_id."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from openedits._logging import FORMAT, ContextFilter, bind
from tests.conftest import AUTH, data_uri


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
