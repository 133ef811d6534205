"""GET /metrics and GET /readyz: what an operator's Prometheus and load balancer read."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from openedits.api.app import create_app
from openedits.engines.base import EngineInfo
from openedits.settings import Settings
from openedits.store._tables import tasks
from openedits.webhooks.outbox import owe_callback
from tests.conftest import AUTH, data_uri
from tests.fakes import BrokerDispatcher, FakeEngine
from tests.servers import serve_in_thread

TIMINGS = {"queue": 0.25, "inputs": 0.5, "engine": 2.0, "results": 0.125, "total": 2.875}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


@pytest.fixture
def gated() -> Iterator[FakeEngine]:
    engine = FakeEngine()
    engine.gate = threading.Event()
    yield engine
    engine.gate.set()


def test_metrics_count_tasks_phases_and_routes(settings: Settings, gated: FakeEngine,
                                               image) -> None:
    app = create_app(settings, engine=gated)
    with TestClient(app) as client:
        reply: dict[str, httpx.Response] = {}
        body = {"image_url": data_uri(image), "prompt": "a hat", "mode": "turbo"}
        sync = threading.Thread(target=lambda: reply.setdefault(
            "r", client.post("/midjourney/edits", headers=AUTH, json=body)))
        sync.start()
        assert gated.started.wait(10)
        queued = client.post("/midjourney/edits", headers=AUTH,
                             json={**body, "async": True}).json()["task_id"]
        during = scrape(client)
        assert during[("openedits_tasks", (("state", "running"),))] == 1
        assert during[("openedits_tasks", (("state", "pending"),))] == 1
        assert during[("openedits_tasks_oldest_pending_age_seconds", ())] >= 0
        # The running task's timings as the runner writes them at its end.
        with app.state.runtime.db.begin() as conn:
            conn.execute(update(tasks).values(timings=TIMINGS))
        gated.gate.set()
        sync.join(20)
        assert reply["r"].status_code == 200, reply["r"].text
        client.post("/midjourney/tasks", headers=AUTH, json={"id": queued})
        client.post("/midjourney/tasks", headers=AUTH, json={"id": "nope"})
        after = scrape(client)
    assert after[("openedits_tasks_submitted_total",
                  (("engine", "fake"), ("mode", "turbo")))] == 2
    assert after[("openedits_tasks_finished_total",
                  (("engine", "fake"), ("state", "succeeded")))] >= 1
    # The runner's own figures may replace the test's; every phase is observed either way.
    for phase in TIMINGS:
        key = (("engine", "fake"), ("phase", phase))
        assert after[("openedits_edit_duration_seconds_count", key)] >= 1
        assert after[("openedits_edit_duration_seconds_sum", key)] >= 0
    total, engine = (after[("openedits_edit_duration_seconds_sum",
                            (("engine", "fake"), ("phase", p)))] for p in ("total", "engine"))
    assert total >= engine
    # Route templates, never ids; one label value for every unknown path.
    assert after[("openedits_http_requests_total",
                  (("method", "POST"), ("route", "/midjourney/tasks"), ("status", "200")))] == 2
    assert not any(queued in str(labels) for _, labels in after)
    assert after[("openedits_http_request_duration_seconds_count",
                  (("route", "/midjourney/edits"),))] == 2
    assert after[("openedits_engine_info",
                  (("device", "cpu"), ("engine", "fake"), ("model", "fake")))] == 1
    assert after[("openedits_store_up", ())] == 1
    assert after[("process_resident_memory_bytes", ())] > 0
    assert any(name == "python_gc_objects_collected_total" for name, _ in after)


def test_unknown_paths_share_one_label(client: TestClient) -> None:
    for i in range(3):
        client.get(f"/no/such/{i}")
    client.get("/files/some-task/grid.png")
    got = scrape(client)
    assert got[("openedits_http_requests_total",
                (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 3
    assert got[("openedits_http_requests_total", (("method", "GET"),
                ("route", "/files/{task_id}/{name}"), ("status", "404")))] == 1


def test_webhook_gauges_read_the_outbox(client: TestClient) -> None:
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    with rt.db.begin() as conn:
        for i in range(2):
            owe_callback(conn, task_id=f"t{i}", url="https://example.com/hook",
                         body={"success": True}, now=rt.clock() + 3600)
    got = scrape(client)
    assert got[("openedits_webhook_pending", ())] == 2
    assert got[("openedits_webhook_deliveries_total", (("outcome", "failed"),))] == 0


def test_metrics_are_per_app(settings: Settings, tmp_path) -> None:
    # Two apps in one process each have their own registry (no duplicate-name error), and
    # one app's counts are not the other's.
    other = settings.model_copy(update={"data_dir": tmp_path / "other"})
    with TestClient(create_app(settings, engine=FakeEngine())) as a, \
            TestClient(create_app(other, engine=FakeEngine())) as b:
        a.get("/healthz")
        assert ("openedits_http_requests_total", (("method", "GET"), ("route", "/healthz"),
                ("status", "200"))) in scrape(a)
        assert ("openedits_http_requests_total", (("method", "GET"), ("route", "/healthz"),
                ("status", "200"))) not in scrape(b)


def test_metrics_need_a_token_off_loopback(client: TestClient, settings: Settings) -> None:
    # TestClient's client is "testclient", not a loopback address.
    r = client.get("/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
    assert "OPENEDITS_METRICS_TOKEN" in r.json()["error"]["message"]
    assert client.get("/metrics", headers={"authorization": "Bearer wrong"}).status_code == 401
    edits_only = client.app.state.runtime.tokens.create("ci", ["edits"])[0]  # type: ignore[attr-defined]
    r = client.get("/metrics", headers={"authorization": f"Bearer {edits_only}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "token_mismatched"


def test_metrics_token(settings: Settings) -> None:
    configured = settings.model_copy(update={"metrics_token": "scrape-me"})
    app = create_app(configured, engine=FakeEngine())
    with serve_in_thread(app) as url:
        # With a metrics token set, even loopback needs it.
        assert httpx.get(url + "/metrics").status_code == 401
        r = httpx.get(url + "/metrics", headers={"authorization": "Bearer scrape-me"})
        assert r.status_code == 200 and "openedits_tasks" in r.text


def test_metrics_open_on_loopback_by_default(settings: Settings) -> None:
    with serve_in_thread(create_app(settings, engine=FakeEngine())) as url:
        r = httpx.get(url + "/metrics")
        assert r.status_code == 200 and "openedits_http_requests_total" in r.text


def test_readyz_ready(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    assert client.head("/readyz").status_code == 200


def test_readyz_names_the_store_when_it_is_gone(client: TestClient) -> None:
    lifecycle = client.app.state.lifecycle  # type: ignore[attr-defined]
    lifecycle.add_check("store", lambda: "the database is unreachable")
    r = client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == "unavailable"
    assert body["not_ready"] == {"store": "the database is unreachable"}
    assert body["trace_id"] == r.headers["x-trace-id"]
    # Liveness is another question: the process is up.
    assert client.get("/healthz").status_code == 200


def test_readyz_waits_for_the_engine(settings: Settings) -> None:
    class Slow(FakeEngine):
        def __init__(self) -> None:
            super().__init__()
            self.release = threading.Event()
            self.is_loaded = False

        def load(self, device: str = "auto") -> None:
            self.release.wait(10)
            self.is_loaded = True

        def info(self) -> EngineInfo:
            return EngineInfo(name=self.name, device="cpu", model="fake", loaded=self.is_loaded)

    engine = Slow()
    with TestClient(create_app(settings, engine=engine)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        assert "loading" in r.json()["not_ready"]["engine"]
        engine.release.set()
        for _ in range(100):
            if client.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert client.get("/readyz").status_code == 200


def test_readyz_fails_while_draining(client: TestClient) -> None:
    client.app.state.lifecycle.draining.set()  # type: ignore[attr-defined]
    r = client.get("/readyz")
    assert r.status_code == 503 and "draining" in r.json()["not_ready"]["process"]


def test_readyz_asks_the_broker_on_an_api_node(settings: Settings) -> None:
    dispatcher = BrokerDispatcher()
    app = create_app(settings, engine=FakeEngine(), dispatcher=dispatcher)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        dispatcher.problem = "broker redis://queue:6379/0 does not answer"
        r = client.get("/readyz")
    assert r.status_code == 503
    # The engine runs on the workers, not here: only the broker is named.
    assert r.json()["not_ready"] == {"broker": "broker redis://queue:6379/0 does not answer"}
