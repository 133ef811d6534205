"""Callbacks through the running app: the outbox written with the task's end, the delivery loop
thread retrying, signatures, and the admin endpoints."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from openedits.api.app import create_app
from openedits.runtime import Runtime
from openedits.schemas import TaskState
from openedits.settings import Settings
from openedits.store.tasks import NewTask
from openedits.webhooks import Delivery, DeliveryState, Outbox
from tests.conftest import AUTH, data_uri
from tests.fakes import FakeEngine, serve_receiver


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared test settings, with callbacks retried in fractions of a second."""
    return settings.model_copy(update={
        "webhook_retry_delays": "0.1s,0.2s,0.3s",
        "webhook_poll_seconds": 0.2,
        "webhook_timeout_seconds": 2,
    })


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=FakeEngine()), raise_server_exceptions=False) as tc:
        yield tc


def _runtime(client: TestClient) -> Runtime:
    rt: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    return rt


def _submit(client: TestClient, image: Any, url: str) -> str:
    r = client.post("/midjourney/edits", headers=AUTH, json={
        "image_url": data_uri(image), "prompt": "x", "callback_url": url})
    assert r.status_code == 200, r.text
    return str(r.json()["task_id"])


def _wait_state(outbox: Outbox, task_id: str, state: DeliveryState) -> Delivery:
    deadline = time.time() + 10
    while time.time() < deadline:
        rows = outbox.for_task(task_id)
        if rows and rows[0].state is state:
            return rows[0]
        time.sleep(0.02)
    raise AssertionError(f"delivery of {task_id} never became {state.value}: {rows}")


def test_receiver_fails_then_succeeds(client: TestClient, image) -> None:
    with serve_receiver() as receiver:
        receiver.script = [(500, {}), (200, {})]
        task_id = _submit(client, image, receiver.url + "/hook")
        got = receiver.wait_for(2)
        _wait_state(Outbox(_runtime(client).db), task_id, DeliveryState.delivered)
    assert len(got) == 2
    assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"]
    assert got[0].headers["webhook-id"].startswith("msg_")
    secret = _runtime(client).webhook_secret()
    assert secret.startswith("whsec_")
    for r in got:
        body = Webhook(secret).verify(r.body, r.headers)
        assert body["task_id"] == task_id and body["success"] is True
        assert body["progress"] == 100
    # The signature really covers the body: a changed byte fails verification.
    with pytest.raises(Exception, match="signature"):
        Webhook(secret).verify(got[1].body.replace(b"true", b"false"), got[1].headers)


def test_410_stops_and_the_admin_can_list_and_resend(client: TestClient, image) -> None:
    with serve_receiver() as receiver:
        receiver.script = [(410, {}), (200, {})]
        task_id = _submit(client, image, receiver.url + "/hook")
        outbox = Outbox(_runtime(client).db)
        _wait_state(outbox, task_id, DeliveryState.failed)
        time.sleep(0.4)  # two retry delays: nothing more may arrive
        assert len(receiver.received) == 1

        listed = client.get("/admin/webhooks/deliveries", headers=AUTH)
        assert listed.status_code == 200, listed.text
        page = listed.json()
        assert page["count"] == 1
        [item] = page["items"]
        assert item["task_id"] == task_id and item["state"] == "failed"
        assert item["last_status"] == 410 and item["attempt_count"] == 1
        assert item["body"]["task_id"] == task_id
        assert [(a["number"], a["status"], a["outcome"]) for a in item["attempts"]] == [
            (1, 410, "gone")]
        assert item["id"] == receiver.received[0].headers["webhook-id"]

        one = client.get(f"/admin/webhooks/deliveries/{item['id']}", headers=AUTH).json()
        assert one["id"] == item["id"]

        resent = client.post(f"/admin/webhooks/deliveries/{item['id']}/resend", headers=AUTH)
        assert resent.status_code == 200, resent.text
        assert resent.json()["state"] in ("pending", "delivered")
        got = receiver.wait_for(2)
        _wait_state(outbox, task_id, DeliveryState.delivered)
    assert got[1].headers["webhook-id"] == item["id"]
    assert client.get("/admin/webhooks/deliveries", headers=AUTH).json()["count"] == 0
    every = client.get("/admin/webhooks/deliveries?state=all", headers=AUTH).json()
    assert [a["outcome"] for a in every["items"][0]["attempts"]] == ["gone", "delivered"]


def test_admin_endpoints_need_an_admin_token(client: TestClient) -> None:
    secret, _info = _runtime(client).tokens.create("worker", ["edits", "tasks"])
    headers = {"authorization": f"Bearer {secret}"}
    for method, path in [("GET", "/admin/webhooks/deliveries"),
                         ("GET", "/admin/webhooks/deliveries/msg_x"),
                         ("POST", "/admin/webhooks/deliveries/msg_x/resend")]:
        r = client.request(method, path, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["code"] == "token_mismatched"
        assert client.request(method, path).status_code == 401
    missing = client.post("/admin/webhooks/deliveries/msg_x/resend", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad = client.get("/admin/webhooks/deliveries?state=lost", headers=AUTH)
    assert bad.status_code == 400 and "state" in bad.json()["error"]["message"]


def test_the_callback_is_owed_before_the_task_is_seen_finished(settings: Settings) -> None:
    rt = Runtime.build(settings, engine=FakeEngine())
    outbox = Outbox(rt.db)
    try:
        for i, url in enumerate(["http://127.0.0.1:9/hook", None]):
            rt.store.create(NewTask(id=f"t-{i}", owner="o", trace_id="tr", request={},
                                    priority=1, base_url="http://x/", callback_url=url), {})
            assert rt.store.claim(f"t-{i}", "w", 30)
            body = {"success": True, "task_id": f"t-{i}"}
            assert rt.store.finish(f"t-{i}", TaskState.succeeded, body, worker_id="w")
        [owed] = outbox.for_task("t-0")
        assert owed.state is DeliveryState.pending and owed.url == "http://127.0.0.1:9/hook"
        assert outbox.for_task("t-1") == []  # no callback_url, nothing owed
        # A finish that loses the guarded transition owes nothing more.
        assert not rt.store.finish("t-0", TaskState.failed, {"success": False}, worker_id="w")
        assert len(outbox.for_task("t-0")) == 1

        # A task whose worker died too often is failed by the reaper, callback included.
        rt.store.create(NewTask(id="t-2", owner="o", trace_id="tr", request={}, priority=1,
                                base_url="http://x/", callback_url="http://127.0.0.1:9/h"), {})
        assert rt.store.claim("t-2", "w", -1)  # a lease that has already run out
        assert rt.store.fail_expired("t-2", {"success": False, "task_id": "t-2"}, 500)
        [reaped] = outbox.for_task("t-2")
        assert '"success":false' in reaped.body
    finally:
        rt.close()
