"""OPENEDITS_DEVICE=cpu,cpu: one engine copy and one worker per device, running at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from openedits.api.app import create_app
from openedits.engines.opencv import OpenCVEngine
from openedits.runtime import Runtime
from openedits.settings import Settings
from openedits.workers.dispatch import InProcessDispatcher, device_runtimes
from tests.conftest import AUTH, TOKEN, data_uri
from tests.fakes import FakeEngine


class DeviceEngine(FakeEngine):
    """Remembers the device it was loaded on and the prompts it edited."""

    def __init__(self) -> None:
        super().__init__(steps=2)
        self.devices: list[str] = []
        self.gate = threading.Event()

    def load(self, device: str = "auto") -> None:
        self.devices.append(device)


def _ended(client: TestClient, task_id: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        state = client.post("/midjourney/tasks", headers=AUTH, json={"id": task_id}).json()["state"]
        if state not in {"pending", "running"} or time.monotonic() > deadline:
            return str(state)
        time.sleep(0.05)


@pytest.mark.parametrize("staged", [True, False])
def test_two_devices_run_two_tasks_at_once_on_their_own_engine_copies(
    tmp_path: Path, image, staged: bool
) -> None:
    settings = Settings(data_dir=tmp_path, api_tokens=TOKEN, allow_private_urls=True,
                        device="cpu,cpu", rate_limit="off", reaper_interval_seconds=0.5)
    engines = [DeviceEngine(), DeviceEngine()]
    rt = Runtime.build(settings, engine=engines[0])
    dispatcher = InProcessDispatcher(rt, engines=engines, staged=staged)
    with TestClient(create_app(settings, runtime=rt, dispatcher=dispatcher)) as client:
        ids = [client.post("/midjourney/edits", headers=AUTH,
                           json={"image_url": data_uri(image), "prompt": f"p{i}", "async": True}
                           ).json()["task_id"] for i in range(2)]
        # Both engines hold a task at the same time: one worker per device, not one in all.
        for engine in engines:
            assert engine.started.wait(10)
        for engine in engines:
            engine.gate.set()
        for task_id in ids:
            assert _ended(client, task_id) == "succeeded"
    assert [len(e.calls) for e in engines] == [1, 1]
    assert all(e.devices and set(e.devices) == {"cpu"} for e in engines)
    rt.close()


def test_each_device_gets_its_own_engine_copy_and_device(tmp_path: Path) -> None:
    rt = Runtime.build(Settings(data_dir=tmp_path, device="cpu, cpu", engine="opencv"))
    runtimes = device_runtimes(rt)
    assert [r.settings.device for r in runtimes] == ["cpu", "cpu"]
    assert runtimes[0].engine is rt.engine and runtimes[1].engine is not rt.engine
    assert all(isinstance(r.engine, OpenCVEngine) for r in runtimes)
    assert all(r.store is rt.store and r.bus is rt.bus for r in runtimes)
    single = Runtime.build(Settings(data_dir=tmp_path / "one"))
    assert device_runtimes(single) == [single]
    single.close()
    with pytest.raises(ValueError, match="2 devices"):
        device_runtimes(rt, [OpenCVEngine()])
    rt.close()
