"""POST /midjourney/edits through the HTTP API: sync, async, callback, split, modes, idempotency."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from openedits.api.app import create_app
from openedits.settings import Settings
from tests.conftest import AUTH, data_uri, png_bytes
from tests.fakes import FakeEngine, serve_receiver

RESULT_KEYS = {
    "success", "task_id", "image_id", "image_url", "image_width", "image_height",
    "raw_image_url", "raw_image_width", "raw_image_height", "sub_image_urls", "progress",
    "actions",
}


def _get_image(client: TestClient, url: str) -> Image.Image:
    path = url.split("://", 1)[1].split("/", 1)[1]
    r = client.get("/" + path)
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(r.content))


def test_sync_edit_returns_the_contract_body(client: TestClient, image, mask) -> None:
    r = client.post("/midjourney/edits", headers=AUTH, json={
        "image_url": data_uri(image), "mask": data_uri(mask), "prompt": "a red apple",
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == RESULT_KEYS
    assert body["success"] is True and body["progress"] == 100 and body["actions"] == []
    assert body["sub_image_urls"] == []
    assert (body["image_width"], body["image_height"]) == (2 * image.width, 2 * image.height)
    assert body["raw_image_url"] == body["image_url"]
    assert body["image_id"].isdigit() and int(body["image_id"]) < 2**64
    assert body["image_url"].endswith(f"/files/{body['task_id']}/grid.png")
    grid = _get_image(client, body["image_url"])
    assert grid.size == (2 * image.width, 2 * image.height)


def test_split_images_variants_keep_pixels_outside_mask(client: TestClient, image, mask) -> None:
    r = client.post("/midjourney/edits", headers=AUTH, json={
        "image_url": data_uri(image), "mask": data_uri(mask), "prompt": "x",
        "split_images": True,
    })
    body = r.json()
    assert [u.rsplit("/", 1)[1] for u in body["sub_image_urls"]] == [
        "0_0.png", "0_1.png", "0_2.png", "0_3.png"]
    keep = np.asarray(mask) == 0
    grid = np.asarray(_get_image(client, body["image_url"]).convert("RGB"))
    variants = []
    for i, url in enumerate(body["sub_image_urls"]):
        v = np.asarray(_get_image(client, url).convert("RGB"))
        assert v.shape[:2] == (image.height, image.width)
        assert np.array_equal(v[keep], np.asarray(image)[keep])
        row, col = divmod(i, 2)
        tile = grid[row * image.height:(row + 1) * image.height,
                    col * image.width:(col + 1) * image.width]
        assert np.array_equal(tile, v)
        variants.append(v.tobytes())
    assert len(set(variants)) == 4


def test_seed_example_against_an_http_image(client: TestClient, image) -> None:
    # The seed's curl example, pointed at a reachable image: no mask, split_images true.
    with serve_receiver() as server:
        server.files["/jgo1cw.jpg"] = (png_bytes(image), "image/jpeg")
        r = client.post("/midjourney/edits", headers={**AUTH, "accept": "application/json"},
                        json={"prompt": "A cat sitting on a table", "split_images": True,
                              "image_url": server.url + "/jgo1cw.jpg", "action": "generate"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == RESULT_KEYS
    assert len(body["sub_image_urls"]) == 4
    assert isinstance(body["image_width"], int) and isinstance(body["raw_image_height"], int)


def test_async_then_retrieve(client: TestClient, image) -> None:
    r = client.post("/midjourney/edits", headers=AUTH, json={
        "image_url": data_uri(image), "prompt": "x", "async": True, "extra_key": [1, 2],
    })
    assert r.status_code == 200
    accepted = r.json()
    assert set(accepted) == {"success", "task_id", "trace_id"}
    assert accepted["trace_id"] == r.headers["x-trace-id"]
    deadline = time.time() + 10
    while True:
        record = client.post("/midjourney/tasks", headers=AUTH,
                             json={"id": accepted["task_id"]}).json()
        if record["state"] == "succeeded" or time.time() > deadline:
            break
        time.sleep(0.05)
    assert record["state"] == "succeeded"
    assert record["id"] == accepted["task_id"] and record["type"] == "edits"
    assert record["trace_id"] == accepted["trace_id"]
    assert record["request"]["extra_key"] == [1, 2]
    # An inline image is kept as a short digest, not the megabytes.
    assert "sha256:" in record["request"]["image_url"]
    assert len(record["request"]["image_url"]) < 120
    assert record["response"]["success"] is True
    assert record["success"] is True and record["image_url"] == record["response"]["image_url"]
    assert record["finished_at"] >= record["started_at"] >= record["created_at"]
    assert record["elapsed"] >= 0
    assert len(record["seeds"]) == 4


def test_callback_receives_the_result(client: TestClient, image) -> None:
    with serve_receiver() as receiver:
        r = client.post("/midjourney/edits", headers=AUTH, json={
            "image_url": data_uri(image), "prompt": "x", "callback_url": receiver.url + "/hook",
            "async": None,
        })
        assert set(r.json()) == {"success", "task_id", "trace_id"}
        got = receiver.wait_for(1)
    assert got, "no callback arrived"
    assert got[0].path == "/hook"
    assert got[0].headers["content-type"].startswith("application/json")
    body = got[0].json()
    assert body["task_id"] == r.json()["task_id"] and body["success"] is True
    assert body["progress"] == 100


def test_failed_sync_task_answers_with_its_error(client: TestClient) -> None:
    with serve_receiver() as server:
        r = client.post("/midjourney/edits", headers=AUTH, json={
            "image_url": server.url + "/missing.png", "prompt": "x"})
    assert r.status_code == 400
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == "bad_request"
    assert "image_url" in body["error"]["message"]
    assert body["trace_id"] == r.headers["x-trace-id"]


def test_engine_crash_fails_the_task_not_the_server(settings: Settings, image) -> None:
    from tests.fakes import BrokenEngine

    with TestClient(create_app(settings, engine=BrokenEngine())) as tc:
        r = tc.post("/midjourney/edits", headers=AUTH,
                    json={"image_url": data_uri(image), "prompt": "x"})
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "api_error"
        assert r.json()["trace_id"] in r.json()["error"]["message"]
        assert tc.get("/healthz").status_code == 200


def test_modes_order_the_queue(settings: Settings, image) -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    with TestClient(create_app(settings, engine=engine)) as tc:
        blocker = tc.post("/midjourney/edits", headers=AUTH, json={
            "image_url": data_uri(image), "prompt": "first", "async": True}).json()
        assert engine.started.wait(5)
        for mode in ("relax", "fast", "turbo"):
            tc.post("/midjourney/edits", headers=AUTH, json={
                "image_url": data_uri(image), "prompt": mode, "mode": mode, "async": True})
        engine.gate.set()
        deadline = time.time() + 10
        while len(engine.calls) < 4 and time.time() < deadline:
            time.sleep(0.05)
        assert blocker["task_id"]
    assert [c["prompt"] for c in engine.calls] == ["first", "turbo", "fast", "relax"]
    assert [c["preset"] for c in engine.calls[1:]] == ["turbo", "fast", "relax"]


def test_idempotency_key_returns_the_same_task(client: TestClient, engine: FakeEngine,
                                               image) -> None:
    body = {"image_url": data_uri(image), "prompt": "x", "async": True}
    headers = {**AUTH, "idempotency-key": "k-1"}
    first = client.post("/midjourney/edits", headers=headers, json=body).json()
    second = client.post("/midjourney/edits", headers=headers, json=body).json()
    assert first["task_id"] == second["task_id"]
    other = client.post("/midjourney/edits", headers=headers, json={**body, "prompt": "y"})
    assert other.status_code == 400 and "Idempotency-Key" in other.json()["error"]["message"]
    batch = client.post("/midjourney/tasks", headers=AUTH,
                        json={"action": "retrieve_batch"}).json()
    assert batch["count"] == 1


def test_seed_reproduces_the_variants(client: TestClient, image) -> None:
    body = {"image_url": data_uri(image), "prompt": "x", "split_images": True, "seed": 42}
    a = client.post("/midjourney/edits", headers=AUTH, json=body).json()
    b = client.post("/midjourney/edits", headers=AUTH, json=body).json()
    for ua, ub in zip(a["sub_image_urls"], b["sub_image_urls"], strict=True):
        assert _get_image(client, ua).tobytes() == _get_image(client, ub).tobytes()


def test_the_app_serves_again_after_its_lifespan_restarts(settings: Settings, image) -> None:
    app = create_app(settings, engine=FakeEngine())
    body = {"image_url": data_uri(image), "prompt": "x"}
    for _ in range(2):
        with TestClient(app) as tc:
            r = tc.post("/midjourney/edits", headers=AUTH, json=body)
            assert r.status_code == 200, r.text
