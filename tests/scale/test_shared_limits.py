"""Limits hold across API nodes: rate limits counted in Redis, the queue bound in the store."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from openedits.api.app import create_app
from openedits.settings import Settings
from tests.conftest import AUTH, TOKEN, data_uri, fresh_postgres
from tests.fakes import FakeEngine
from tests.scale._fleet import REDIS_URL, needs_services

pytestmark = [pytest.mark.services, needs_services]


class _Parked:
    """A dispatcher whose workers never come: tasks stay pending."""

    name = "parked"

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, task_id: str, priority: int) -> None: ...


def _node(tmp_path: Path, name: str, **values: object) -> TestClient:
    settings = Settings(data_dir=tmp_path / name, api_tokens=TOKEN, allow_private_urls=True,
                        **values)  # type: ignore[arg-type]
    return TestClient(create_app(settings, engine=FakeEngine(), dispatcher=_Parked()))


def test_two_nodes_share_one_rate_limit_through_redis(tmp_path: Path, image) -> None:
    # A fresh Redis database number keeps other tests' counters out of this one.
    storage = f"{REDIS_URL.rsplit('/', 1)[0]}/{3 + secrets.randbelow(10)}"  # type: ignore[union-attr]
    import redis

    redis.Redis.from_url(storage).flushdb()
    body = {"image_url": data_uri(image), "prompt": "x", "async": True}
    with _node(tmp_path, "a", rate_limit="3/minute", rate_limit_storage_url=storage) as a, \
            _node(tmp_path, "b", rate_limit="3/minute", rate_limit_storage_url=storage) as b:
        assert a.post("/midjourney/edits", headers=AUTH, json=body).status_code == 200
        assert b.post("/midjourney/edits", headers=AUTH, json=body).status_code == 200
        assert a.post("/midjourney/edits", headers=AUTH, json=body).status_code == 200
        refused = b.post("/midjourney/edits", headers=AUTH, json=body)
    assert refused.status_code == 429 and "Retry-After" in refused.headers
    assert refused.headers["x-ratelimit-remaining"] == "0"


def test_the_queue_bound_counts_every_nodes_tasks(tmp_path: Path, image) -> None:
    body = {"image_url": data_uri(image), "prompt": "x", "async": True}
    with fresh_postgres() as db_url:
        with _node(tmp_path, "a", database_url=db_url, queue_max=2) as a, \
                _node(tmp_path, "b", database_url=db_url, queue_max=2) as b:
            assert a.post("/midjourney/edits", headers=AUTH, json=body).status_code == 200
            assert a.post("/midjourney/edits", headers=AUTH, json=body).status_code == 200
            full = b.post("/midjourney/edits", headers=AUTH, json=body)
        assert full.status_code == 429 and "queue" in full.json()["error"]["message"]
