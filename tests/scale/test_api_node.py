"""With a broker, `openedits serve` is an API node: no engine loaded, no torch imported, tasks
published to Celery; and migrations are safe when a whole fleet starts at once."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from sqlalchemy import inspect

from openedits.store.database import create_db_engine, migrate
from tests.conftest import fresh_postgres
from tests.scale._fleet import REDIS_URL, needs_services
from tests.servers import ROOT

pytestmark = [pytest.mark.services, needs_services]

_PROBE = """
import sys
from fastapi.testclient import TestClient
from openedits.api.app import create_app
from openedits.settings import Settings
settings = Settings(broker_url=sys.argv[1], database_url=sys.argv[2], blobs_url="s3://b/p",
                    diffusers_model="/models/that-would-need-torch", api_tokens="t")
with TestClient(create_app(settings)) as client:
    health = client.get("/healthz").json()
print(health["dispatcher"], health["engine"]["name"], health["engine"]["loaded"],
      "torch" in sys.modules, "diffusers" in sys.modules)
"""


def test_an_api_node_loads_no_engine_and_imports_no_torch() -> None:
    with fresh_postgres() as db_url:
        out = subprocess.run([sys.executable, "-c", _PROBE, str(REDIS_URL), db_url], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["celery", "diffusers", "False", "False", "False"]


def test_migrations_started_together_on_postgresql_all_succeed() -> None:
    with fresh_postgres() as db_url:
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)

        def start() -> None:
            engine = create_db_engine(db_url)  # each its own pool, as separate processes
            try:
                barrier.wait()
                migrate(engine)
            except BaseException as exc:
                errors.append(exc)
            finally:
                engine.dispose()

        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        engine = create_db_engine(db_url)
        assert {"tasks", "webhook_deliveries", "alembic_version"} <= set(
            inspect(engine).get_table_names())
        engine.dispose()
