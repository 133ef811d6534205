"""GET /files, GET /healthz and the OpenAPI document."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.conftest import AUTH, data_uri


@pytest.mark.parametrize("path", [
    "/files/../openedits.db",
    "/files/..%2F..%2Fetc/passwd",
    "/files/00000000-0000-0000-0000-000000000000/..%2Fx",
    "/files/00000000-0000-0000-0000-000000000000/grid.png",
    "/files/not-a-task/grid.png",
    "/files/00000000-0000-0000-0000-000000000000/.hidden",
])
def test_files_refuse_traversal_and_unknowns(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_files_serve_results_as_png(client: TestClient, image) -> None:
    body = client.post("/midjourney/edits", headers=AUTH,
                       json={"image_url": data_uri(image), "prompt": "x"}).json()
    r = client.get(f"/files/{body['task_id']}/grid.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG")


def test_healthz(client: TestClient) -> None:
    body = client.get("/healthz").json()
    assert body["status"] == "ok"
    assert body["engine"]["name"] == "fake"
    assert body["store"] == {"backend": "sqlite", "ok": True}
    assert body["dispatcher"] == "in-process"


def test_openapi_describes_the_contract(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    edits = doc["paths"]["/midjourney/edits"]["post"]
    schema = edits["requestBody"]["content"]["application/json"]["schema"]
    assert {"image_url", "prompt"} <= set(schema["required"])
    assert {"400", "401", "429", "500"} <= set(edits["responses"])
    assert "/midjourney/tasks" in doc["paths"]
