"""Blobs: the local folder, and S3 against a real S3 server (SeaweedFS, started by scripts/test)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from openedits.api.app import create_app
from openedits.blobs import LocalBlobs, S3Blobs, create_blobs
from openedits.errors import NotFound
from openedits.retention import RESULT_FILES, purge_expired
from openedits.runtime import Runtime
from openedits.schemas import TaskState
from openedits.settings import Settings
from openedits.store.tasks import NewTask
from tests.conftest import AUTH, TOKEN, data_uri
from tests.fakes import FakeClock, FakeEngine
from tests.scale._fleet import S3_BUCKET, needs_s3, s3_client

KEY = "0d9a3f0e-1111-4222-8333-944455556666/grid.png"


@pytest.fixture
def s3() -> Iterator[S3Blobs]:
    yield S3Blobs(S3_BUCKET, f"unit-{secrets.token_hex(4)}", client=s3_client())


def test_create_blobs_reads_the_url() -> None:
    assert isinstance(create_blobs(None, Path("/tmp/x")), LocalBlobs)
    assert isinstance(create_blobs("file:///tmp/y", Path("/tmp/x")), LocalBlobs)
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        create_blobs("gs://bucket", Path("/tmp/x"))
    with pytest.raises(ValueError, match="names no bucket"):
        create_blobs("s3:///prefix", Path("/tmp/x"))


@needs_s3
def test_s3_put_get_delete(s3: S3Blobs) -> None:
    s3.put(KEY, b"\x89PNG data", "image/png")
    assert s3.get(KEY) == b"\x89PNG data"
    assert s3.local_path(KEY) is None
    head = s3.client.head_object(Bucket=S3_BUCKET, Key=s3.prefix + KEY)
    assert head["ContentType"] == "image/png"
    s3.delete(KEY)
    s3.delete(KEY)  # already gone: no error
    with pytest.raises(NotFound):
        s3.get(KEY)
    with pytest.raises(NotFound):
        s3.put("../../etc/passwd", b"x", "image/png")


@needs_s3
def test_s3_links_public_presigned_or_this_server(s3: S3Blobs) -> None:
    s3.put(KEY, b"pixels", "image/png")
    assert s3.url(KEY, "http://api.example/") == f"http://api.example/files/{KEY}"
    public = S3Blobs(S3_BUCKET, s3.prefix, client=s3.client, public_url="https://cdn.example/")
    assert public.url(KEY, "http://api.example") == f"https://cdn.example/{s3.prefix}{KEY}"
    signed = S3Blobs(S3_BUCKET, s3.prefix, client=s3.client, presign_seconds=60)
    link = signed.url(KEY, "http://api.example")
    assert "X-Amz-Signature=" in link and "X-Amz-Expires=60" in link
    assert httpx.get(link, timeout=10).content == b"pixels"
    tampered = link.replace("X-Amz-Expires=60", "X-Amz-Expires=600")
    assert httpx.get(tampered, timeout=10).status_code == 403


@needs_s3
def test_results_are_written_to_the_bucket_and_served_from_it(tmp_path: Path, image,
                                                              s3: S3Blobs) -> None:
    settings = Settings(data_dir=tmp_path, api_tokens=TOKEN, allow_private_urls=True)
    rt = Runtime.build(settings, engine=FakeEngine(), blobs=s3)
    with TestClient(create_app(settings, runtime=rt)) as client:
        reply = client.post("/midjourney/edits", headers=AUTH,
                            json={"image_url": data_uri(image), "prompt": "x",
                                  "split_images": True})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        task_id = body["task_id"]
        stored = s3.get(f"{task_id}/grid.png")
        served = client.get(body["image_url"].replace("http://testserver", ""))
        assert served.status_code == 200 and served.content == stored
        assert served.headers["content-type"] == "image/png"
        assert client.get(f"/files/{task_id}/nope.png").status_code == 404
    assert not (tmp_path / "files").exists()
    rt.close()


@needs_s3
def test_retention_deletes_the_objects(tmp_path: Path, s3: S3Blobs) -> None:
    clock = FakeClock(1_000_000_000.0)
    rt = Runtime.build(Settings(data_dir=tmp_path, retention_days=1), engine=FakeEngine(),
                       blobs=s3, clock=clock)
    task_id = "00000001-0000-0000-0000-000000000000"
    rt.store.create(NewTask(id=task_id, owner="o", trace_id="t", request={}, priority=1,
                            base_url="http://h/"), {"image_url": "data:..."})
    for name in RESULT_FILES:
        s3.put(f"{task_id}/{name}", b"png", "image/png")
    assert rt.store.claim(task_id, "w", 30)
    assert rt.store.finish(task_id, TaskState.succeeded, {"success": True}, worker_id="w")
    clock.now += 2 * 86400
    assert purge_expired(rt) == 1
    listed = s3.client.list_objects_v2(Bucket=S3_BUCKET, Prefix=s3.prefix)
    assert listed.get("KeyCount", 0) == 0
    rt.close()
