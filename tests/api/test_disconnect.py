"""A sync caller that hangs up stops being waited for; its task goes on and ends."""

from __future__ import annotations

import threading
import time

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
