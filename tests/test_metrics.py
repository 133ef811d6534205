"""Metrics outside the API: a worker process's own endpoint, and scrapes that never load torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from openedits.metrics import Metrics, serve_metrics
from openedits.runtime import Runtime
from openedits.settings import Settings
from tests.fakes import FakeEngine, FakeTorch
from tests.servers import free_port


def test_a_worker_serves_its_metrics_on_a_port(tmp_path: Path) -> None:
    rt = Runtime.build(Settings(data_dir=tmp_path), engine=FakeEngine())
    metrics = Metrics()
    metrics.watch(rt)
    port = free_port()
    stop = serve_metrics(metrics, port)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert r.status_code == 200
        assert 'openedits_tasks{state="pending"} 0.0' in r.text
        assert 'openedits_engine_info{device="cpu",engine="fake",model="fake"} 1.0' in r.text
    finally:
        stop()
        rt.close()


def test_a_store_that_does_not_answer_is_a_metric_not_an_error(tmp_path: Path) -> None:
    rt = Runtime.build(Settings(data_dir=tmp_path), engine=FakeEngine())
    metrics = Metrics(process=False)
    metrics.watch(rt)
    rt.db.dispose()
    (tmp_path / "openedits.db").unlink()
    (tmp_path / "openedits.db").mkdir()  # no longer a database file
    text = metrics.render().decode()
    assert "openedits_store_up 0.0" in text
    assert "openedits_engine_info" in text
    rt.close()


def test_scraping_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from openedits.engines.registry import build_engine\n"
        "from openedits.metrics import Metrics\n"
        "from openedits.runtime import Runtime\n"
        "from openedits.settings import Settings\n"
        f"s = Settings(data_dir={str(tmp_path)!r}, engine='opencv')\n"
        "rt = Runtime.build(s, engine=build_engine(s))\n"
        "m = Metrics(); m.watch(rt); text = m.render().decode()\n"
        "assert 'openedits_tasks' in text and 'device_memory' not in text\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_cuda_memory_shows_only_where_torch_already_uses_cuda(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = Runtime.build(Settings(data_dir=tmp_path), engine=FakeEngine())
    metrics = Metrics(process=False)
    metrics.watch(rt)
    monkeypatch.setitem(sys.modules, "torch", FakeTorch(devices=2))
    text = metrics.render().decode()
    assert 'openedits_device_memory_allocated_bytes{device="cuda:1"} 2.147483648e+09' in text
    assert 'openedits_device_memory_reserved_bytes{device="cuda:0"} 2.147483648e+09' in text
    assert 'openedits_device_memory_total_bytes{device="cuda:0"}' in text
    # A process that has not touched CUDA does not get a context made by a scrape.
    monkeypatch.setitem(sys.modules, "torch", FakeTorch(devices=2, initialized=False))
    assert "device_memory" not in metrics.render().decode()
    rt.close()
