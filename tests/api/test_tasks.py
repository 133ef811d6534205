"""POST /midjourney/tasks: retrieve and retrieve_batch, scoped to the caller's token."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import AUTH, data_uri


def _submit(client: TestClient, image, headers=AUTH, **extra) -> dict:
    r = client.post("/midjourney/edits", headers=headers,
                    json={"image_url": data_uri(image), "prompt": "x", **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_retrieve_by_id_and_trace_id(client: TestClient, image) -> None:
    done = _submit(client, image)
    by_id = client.post("/midjourney/tasks", headers=AUTH,
                        json={"action": "retrieve", "id": done["task_id"]}).json()
    assert by_id["state"] == "succeeded" and by_id["response"] == done
    by_trace = client.post("/midjourney/tasks", headers=AUTH,
                           json={"trace_id": by_id["trace_id"]}).json()
    assert by_trace["id"] == done["task_id"]


def test_unknown_task_is_empty_object(client: TestClient) -> None:
    for body in ({"id": "00000000-0000-0000-0000-000000000000"}, {"trace_id": "nope"}):
        r = client.post("/midjourney/tasks", headers=AUTH, json=body)
        assert r.status_code == 200 and r.json() == {}


def test_retrieve_needs_an_id(client: TestClient) -> None:
    r = client.post("/midjourney/tasks", headers=AUTH, json={"action": "retrieve"})
    assert r.status_code == 400 and "id" in r.json()["error"]["message"]


def test_batch_by_ids_trace_ids_and_recent(client: TestClient, image) -> None:
    done = [_submit(client, image) for _ in range(3)]
    ids = [d["task_id"] for d in done]
    by_ids = client.post("/midjourney/tasks", headers=AUTH,
                         json={"action": "retrieve_batch", "ids": ids[:2]}).json()
    assert by_ids["count"] == 2 and {i["id"] for i in by_ids["items"]} == set(ids[:2])
    traces = [by_ids["items"][0]["trace_id"]]
    by_trace = client.post("/midjourney/tasks", headers=AUTH,
                           json={"action": "retrieve_batch", "trace_ids": traces}).json()
    assert by_trace["count"] == 1
    recent = client.post("/midjourney/tasks", headers=AUTH,
                         json={"action": "retrieve_batch", "limit": 2}).json()
    assert recent["count"] == 3 and len(recent["items"]) == 2
    assert [i["id"] for i in recent["items"]] == ids[::-1][:2]
    page2 = client.post("/midjourney/tasks", headers=AUTH,
                        json={"action": "retrieve_batch", "limit": 2, "offset": 2}).json()
    assert [i["id"] for i in page2["items"]] == [ids[0]]


def test_batch_limit_is_bounded(client: TestClient) -> None:
    for limit in (0, 101, -1, "5"):
        r = client.post("/midjourney/tasks", headers=AUTH,
                        json={"action": "retrieve_batch", "limit": limit})
        assert r.status_code == 400 and "limit" in r.json()["error"]["message"]


def test_tokens_see_only_their_own_tasks(client: TestClient, image) -> None:
    tokens = client.app.state.runtime.tokens
    alice, _ = tokens.create("alice", ["edits", "tasks"])
    admin, _ = tokens.create("ops", ["admin"])
    a_headers = {"authorization": f"Bearer {alice}"}
    mine = _submit(client, image)
    theirs = _submit(client, image, headers=a_headers)
    seen = client.post("/midjourney/tasks", headers=a_headers,
                       json={"action": "retrieve_batch"}).json()
    assert [i["id"] for i in seen["items"]] == [theirs["task_id"]]
    assert client.post("/midjourney/tasks", headers=a_headers,
                       json={"id": mine["task_id"]}).json() == {}
    everything = client.post("/midjourney/tasks", headers={"authorization": f"Bearer {admin}"},
                             json={"action": "retrieve_batch"}).json()
    assert everything["count"] == 2
    tokens.revoke(tokens.lookup(alice).id)
    r = client.post("/midjourney/tasks", headers=a_headers, json={"id": theirs["task_id"]})
    assert r.status_code == 401
