"""The sync Client: the wire it speaks (against a scripted server) and against the real app."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

import openedits.client as sdk
from openedits.client import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    Client,
    EditResult,
    NotFoundError,
    NotImplementedOnServerError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TaskCancelledError,
    TaskFailedError,
    TaskRecord,
    TokenMismatchedError,
    WaitTimeoutError,
    to_image_url,
)
from tests.client.client_support import (
    TOKEN,
    FakeServer,
    LiveServer,
    mask_bytes,
    png_bytes,
    size_of,
)


def client_for(fake: FakeServer, **kwargs: Any) -> Client:
    kwargs.setdefault("poll_interval", 0.001)
    kwargs.setdefault("max_poll_interval", 0.005)
    return Client(base_url=fake.base_url, token=TOKEN, transport=fake.transport(), **kwargs)


def decode_data_uri(uri: str) -> tuple[str, bytes]:
    head, payload = uri.split(",", 1)
    return head, base64.b64decode(payload)


# --- the public surface ----------------------------------------------------------------------


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(sdk) if not name.startswith("_")}
    # Submodules imported by the package itself are not part of its surface.
    public -= {name for name in public if type(getattr(sdk, name)).__name__ == "module"}
    assert sorted(sdk.__all__) == sorted(public)
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None


# --- edit / submit / wait --------------------------------------------------------------------


def test_edit_submits_async_then_polls_to_the_result(
    fake: FakeServer, image_file: Path, mask_file: Path
) -> None:
    seen: list[tuple[str, int]] = []
    with client_for(fake) as client:
        result = client.edit(
            image=image_file,
            mask=mask_file,
            prompt="a red hat",
            split_images=True,
            mode="turbo",
            on_progress=lambda r: seen.append((r.status, r.progress)),
        )
    assert result.done and result.task_id in fake.tasks
    assert result.image_url == f"{fake.base_url}/files/{result.task_id}/grid.png"
    assert (result.image_width, result.image_height) == (128, 96)
    assert len(result.sub_image_urls) == 4 and result.progress == 100
    assert seen == [("pending", 0), ("running", 40), ("running", 80), ("succeeded", 100)]

    [body] = fake.bodies("/midjourney/edits")
    assert body["action"] == "generate" and body["async"] is True
    assert (
        body["prompt"] == "a red hat" and body["mode"] == "turbo" and body["split_images"] is True
    )
    assert "callback_url" not in body  # absent, never null
    head, data = decode_data_uri(body["image_url"])
    assert head == "data:image/png;base64" and data == image_file.read_bytes()
    assert decode_data_uri(body["mask"])[1] == mask_file.read_bytes()
    submit = fake.requests[0]
    assert submit.headers["authorization"] == f"Bearer {TOKEN}"
    assert submit.headers["idempotency-key"]


def test_edit_accepts_a_server_that_ignores_async(fake: FakeServer) -> None:
    fake.honour_async = False
    with client_for(fake) as client:
        result = client.edit(image=png_bytes(), prompt="x")
    assert result.done
    assert [r.url.path for r in fake.requests] == ["/midjourney/edits"]


def test_edit_without_wait_returns_the_task_id_only(fake: FakeServer) -> None:
    with client_for(fake) as client:
        pending = client.edit(image="https://example.com/a.png", prompt="x", wait=False)
        assert pending.task_id in fake.tasks and not pending.done
        assert client.wait(pending.task_id).done
    assert fake.bodies("/midjourney/edits")[0]["image_url"] == "https://example.com/a.png"


def test_submit_accepts_the_hosted_bare_task_id_reply(fake: FakeServer) -> None:
    fake.edit_replies.append((200, {"task_id": "b8b7fdc2"}, {}))
    with client_for(fake) as client:
        assert (
            client.submit(image=png_bytes(), prompt="x", callback_url="https://hook.test/")
            == "b8b7fdc2"
        )
    assert fake.bodies("/midjourney/edits")[0]["callback_url"] == "https://hook.test/"


def test_a_failed_task_raises_with_its_code_and_message(fake: FakeServer) -> None:
    fake.fail = {"code": "bad_request", "message": "the mask is empty"}
    with client_for(fake) as client, pytest.raises(TaskFailedError) as info:
        client.edit(image=png_bytes(), prompt="x")
    assert info.value.code == "bad_request" and info.value.message == "the mask is empty"
    assert info.value.task_id in fake.tasks
    assert not isinstance(info.value, TaskCancelledError)


def test_a_cancelled_task_raises_task_cancelled(fake: FakeServer) -> None:
    fake.script = [0] * 1000
    with client_for(fake) as client:
        task_id = client.submit(image=png_bytes(), prompt="x")
        record = client.cancel(task_id)
        assert record is not None and record.status == "cancelled"
        with pytest.raises(TaskCancelledError):
            client.wait(task_id)


def test_wait_gives_up_at_its_deadline_and_says_the_task_goes_on(fake: FakeServer) -> None:
    fake.script = [0] * 100_000
    with client_for(fake) as client:
        task_id = client.submit(image=png_bytes(), prompt="x")
        with pytest.raises(WaitTimeoutError) as info:
            client.wait(task_id, timeout=0.05)
    assert info.value.task_id == task_id and "goes on" in str(info.value)
    assert isinstance(info.value, TimeoutError)


def test_wait_backs_off_between_polls() -> None:
    from openedits.client._wire import Poller

    now = [0.0]
    poller = Poller("t", timeout=10.0, interval=0.5, max_interval=2.0, clock=lambda: now[0])
    delays = [poller.next_delay() for _ in range(6)]
    assert delays == [0.5, 0.75, 1.125, 1.6875, 2.0, 2.0]
    now[0] = 9.5
    assert poller.next_delay() == 0.5  # cut to the deadline
    now[0] = 10.0
    with pytest.raises(WaitTimeoutError):
        poller.next_delay()


def test_wait_rides_out_a_connection_blip(fake: FakeServer) -> None:
    blips = [2]

    def flaky(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/midjourney/tasks" and blips[0] > 0:
            blips[0] -= 1
            raise httpx.ConnectError("connection refused", request=request)
        return fake.handle(request)

    with Client(
        base_url=fake.base_url,
        token=TOKEN,
        transport=httpx.MockTransport(flaky),
        max_retries=0,
        poll_interval=0.001,
    ) as client:
        assert client.edit(image=png_bytes(), prompt="x").done
    assert blips == [0]


# --- errors from the envelope ----------------------------------------------------------------

ENVELOPE_CASES = [
    (400, "bad_request", BadRequestError),
    (400, "token_mismatched", TokenMismatchedError),
    (400, "api_not_implemented", NotImplementedOnServerError),
    (401, "invalid_token", AuthenticationError),
    (403, "forbidden", PermissionDeniedError),
    (404, "not_found", NotFoundError),
    (413, "payload_too_large", PayloadTooLargeError),
    (429, "too_many_requests", RateLimitError),
    (500, "api_error", ServerError),
    (504, "timeout", APITimeoutError),
    (418, "teapot", APIError),  # an unknown code and status still lands in APIError
]


@pytest.mark.parametrize(("status", "code", "cls"), ENVELOPE_CASES)
def test_error_envelope_maps_to_the_exception_tree(
    fake: FakeServer, status: int, code: str, cls: type[APIError]
) -> None:
    fake.edit_replies.append(
        (
            status,
            {"success": False, "error": {"code": code, "message": "why"}, "trace_id": "tr-1"},
            {"retry-after": "7"},
        )
    )
    with client_for(fake, max_retries=0) as client, pytest.raises(cls) as info:
        client.edit(image=png_bytes(), prompt="x")
    error = info.value
    assert type(error) is cls
    assert (error.status, error.code, error.message, error.trace_id) == (
        status,
        code,
        "why",
        "tr-1",
    )
    assert str(error) == f"{status} {code}: why (trace_id tr-1)"
    if isinstance(error, RateLimitError):
        assert error.retry_after == 7.0


def test_a_proxy_page_is_still_a_readable_server_error(fake: FakeServer) -> None:
    fake.edit_replies.append((502, "<html>Bad Gateway</html>\n<body>…", {"x-trace-id": "px"}))
    with client_for(fake, max_retries=0) as client, pytest.raises(ServerError) as info:
        client.submit(image=png_bytes(), prompt="x")
    assert info.value.status == 502 and "Bad Gateway" in info.value.message
    assert info.value.trace_id == "px"


def test_wrong_token_is_an_authentication_error(fake: FakeServer) -> None:
    client = Client(base_url=fake.base_url, token="nope", transport=fake.transport())
    with client, pytest.raises(AuthenticationError):
        client.retrieve("x")


def test_429_is_retried_after_retry_after_with_the_same_idempotency_key(fake: FakeServer) -> None:
    envelope = {"success": False, "error": {"code": "too_many_requests", "message": "slow"}}
    fake.edit_replies.append((429, envelope, {"retry-after": "0"}))
    with client_for(fake) as client:
        task_id = client.submit(image=png_bytes(), prompt="x")
    assert task_id in fake.tasks
    keys = [r.headers["idempotency-key"] for r in fake.requests if r.url.path.endswith("edits")]
    assert len(keys) == 2 and keys[0] == keys[1]


def test_500_is_not_retried(fake: FakeServer) -> None:
    envelope = {"success": False, "error": {"code": "api_error", "message": "boom"}}
    fake.edit_replies.extend([(500, envelope, {}), (500, envelope, {})])
    with client_for(fake) as client, pytest.raises(ServerError):
        client.submit(image=png_bytes(), prompt="x")
    assert len(fake.requests) == 1


def test_an_unreachable_server_is_a_connection_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = Client(
        base_url="http://api.test", transport=httpx.MockTransport(refuse), max_retries=0
    )
    with client, pytest.raises(APIConnectionError, match=r"no answer from http://api\.test"):
        client.retrieve("x")


# --- stream ----------------------------------------------------------------------------------


def test_stream_yields_rising_progress_then_the_result(fake: FakeServer) -> None:
    with client_for(fake) as client:
        items = list(client.stream(image=png_bytes(), prompt="x", split_images=True))
    assert [i.progress for i in items] == [0, 40, 80, 100]
    assert items[-1].done and len(items[-1].sub_image_urls) == 4
    request = fake.requests[0]
    assert "application/x-ndjson" in request.headers["accept"]
    assert "async" not in json.loads(request.content)


def test_stream_handles_a_plain_json_reply(fake: FakeServer) -> None:
    task = {"task_id": "t1", "success": True, "image_url": "http://api.test/files/t1/grid.png"}
    fake.edit_replies.append((200, task, {}))
    with client_for(fake) as client:
        items = list(client.stream(image=png_bytes(), prompt="x"))
    assert len(items) == 1 and items[0].done


def test_stream_that_breaks_off_is_finished_by_polling(fake: FakeServer) -> None:
    def cut(request: httpx.Request) -> httpx.Response:
        response = fake.handle(request)
        if request.url.path == "/midjourney/edits":
            first = response.content.split(b"\n")[0] + b"\n"
            return httpx.Response(200, content=first, headers=response.headers)
        return response

    with Client(
        base_url=fake.base_url, token=TOKEN, transport=httpx.MockTransport(cut), poll_interval=0.001
    ) as client:
        items = list(client.stream(image=png_bytes(), prompt="x"))
    assert items[0].progress == 0 and items[-1].done
    assert any(r.url.path == "/midjourney/tasks" for r in fake.requests)


def test_stream_failure_line_raises(fake: FakeServer) -> None:
    fake.fail = {"code": "api_error", "message": "engine broke"}
    with client_for(fake) as client, pytest.raises(TaskFailedError, match="engine broke"):
        list(client.stream(image=png_bytes(), prompt="x"))


# --- tasks -----------------------------------------------------------------------------------


def test_retrieve_of_an_unknown_task_is_none(fake: FakeServer) -> None:
    with client_for(fake) as client:
        assert client.retrieve("missing") is None


def test_retrieve_batch_pages_through_recent_tasks(fake: FakeServer) -> None:
    with client_for(fake) as client:
        ids = [client.submit(image=png_bytes(), prompt=str(i)) for i in range(3)]
        page = client.retrieve_batch(offset=1, limit=1)
        assert page.count == 3 and [r.id for r in page.items] == ids[1:2]
        chosen = client.retrieve_batch(ids[:2])
        assert [r.id for r in chosen.items] == ids[:2]
    assert fake.bodies("/midjourney/tasks")[-1] == {
        "action": "retrieve_batch",
        "offset": 0,
        "limit": 12,
        "ids": ids[:2],
    }


@pytest.mark.parametrize(
    ("record", "status", "progress"),
    [
        ({}, "pending", 0),
        ({"response": {"progress": 30}}, "running", 30),
        ({"response": {"success": True, "progress": 100, "image_url": "u"}}, "succeeded", 100),
        ({"response": {"success": False, "error": {"code": "api_error"}}}, "failed", 0),
        ({"response": {"success": False, "error": {"code": "cancelled"}}}, "cancelled", 0),
        ({"state": "cancelled"}, "cancelled", 0),
        ({"state": "running"}, "running", 0),
    ],
)
def test_task_status_is_judged_the_hosted_way(
    record: dict[str, Any], status: str, progress: int
) -> None:
    parsed = TaskRecord.model_validate({"id": "t", **record})
    assert (parsed.status, parsed.progress) == (status, progress)
    assert parsed.ended == (status in ("succeeded", "failed", "cancelled"))


# --- results and files -----------------------------------------------------------------------


def test_save_writes_grid_and_variants_and_keeps_the_token_home(
    fake: FakeServer, tmp_path: Path
) -> None:
    with client_for(fake) as client:
        result = client.edit(image=png_bytes(), prompt="x", split_images=True)
        paths = result.save(tmp_path / "out")
        assert [p.name for p in paths] == ["grid.png", "0_0.png", "0_1.png", "0_2.png", "0_3.png"]
        assert all(size_of(p) == (8, 8) for p in paths)
        assert sorted(q.name for q in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
        own = [r for r in fake.requests if r.url.path.startswith("/files/")]
        assert own and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in own)

        cdn = EditResult(success=True, task_id="t", image_url="https://cdn.test/a/cat.png?sig=1")
        cdn._downloader = client
        fake.requests.clear()
        assert [p.name for p in cdn.save(tmp_path / "cdn")] == ["grid.png"]
        assert fake.requests[0].url.host == "cdn.test"
        assert "authorization" not in fake.requests[0].headers


def test_download_error_is_raised_not_written(fake: FakeServer, tmp_path: Path) -> None:
    def missing(request: httpx.Request) -> httpx.Response:
        return fake.error(404, "not_found", "no file", "tr")

    with Client(base_url=fake.base_url, transport=httpx.MockTransport(missing)) as client:
        result = EditResult(
            success=True, task_id="t", image_url=f"{fake.base_url}/files/t/grid.png"
        )
        result._downloader = client
        with pytest.raises(NotFoundError):
            result.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- sources ---------------------------------------------------------------------------------


def test_sources_become_data_uris_with_the_sniffed_type(tmp_path: Path) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    assert to_image_url(jpeg.getvalue()).startswith("data:image/jpeg;base64,")
    webp = io.BytesIO()
    Image.new("RGB", (4, 4)).save(webp, format="WEBP")
    assert to_image_url(webp.getvalue()).startswith("data:image/webp;base64,")
    pil = Image.new("L", (5, 3), 255)
    head, data = decode_data_uri(to_image_url(pil))
    assert head == "data:image/png;base64" and size_of(data) == (5, 3)
    path = tmp_path / "m.png"
    path.write_bytes(mask_bytes())
    assert decode_data_uri(to_image_url(str(path)))[1] == mask_bytes()
    for passthrough in ("https://x.test/a.png", "http://x.test/a", "data:image/png;base64,AAAA"):
        assert to_image_url(passthrough) == passthrough


def test_bad_sources_fail_before_any_request(fake: FakeServer, tmp_path: Path) -> None:
    with client_for(fake) as client:
        with pytest.raises(FileNotFoundError, match=r"image: 'nope\.png' is neither"):
            client.edit(image="nope.png", prompt="x")
        (tmp_path / "notes.txt").write_text("hello")
        with pytest.raises(ValueError, match=r"mask: the file .* is not a PNG"):
            client.edit(image=png_bytes(), mask=tmp_path / "notes.txt", prompt="x")
        with pytest.raises(TypeError, match="got int"):
            client.edit(image=12, prompt="x")  # type: ignore[arg-type]
    assert fake.requests == []


# --- end to end: the real app ----------------------------------------------------------------


def test_edit_against_the_served_app(
    live_server: LiveServer, image_file: Path, mask_file: Path, tmp_path: Path
) -> None:
    with Client(base_url=live_server.url, token=TOKEN, poll_interval=0.05) as client:
        progress: list[int] = []
        result = client.edit(
            image=image_file,
            mask=mask_file,
            prompt="remove the dot",
            split_images=True,
            timeout=120,
            on_progress=lambda r: progress.append(r.progress),
        )
        assert result.done and progress[-1] == 100
        assert result.image_url == f"{live_server.url}/files/{result.task_id}/grid.png"
        assert len(result.sub_image_urls) == 4
        paths = result.save(tmp_path / "out")
        assert size_of(paths[0]) == (result.image_width, result.image_height) == (128, 96)
        assert all(size_of(p) == (64, 48) for p in paths[1:])

        record = client.retrieve(result.task_id)
        assert record is not None and record.status == "succeeded" and record.result is not None
        assert record.result.image_url == result.image_url
        page = client.retrieve_batch([result.task_id])
        assert [r.id for r in page.items] == [result.task_id]
        assert client.retrieve("00000000-0000-0000-0000-000000000000") is None


def test_served_app_errors_come_back_as_the_tree(live_server: LiveServer) -> None:
    with (
        Client(base_url=live_server.url, token="wrong") as client,
        pytest.raises(AuthenticationError),
    ):
        client.retrieve_batch()
    with Client(base_url=live_server.url, token=TOKEN) as client:
        # A field error is refused at submit; an image that fails to decode fails the task.
        with pytest.raises(BadRequestError) as refused:
            client.edit(image=png_bytes(), mask=mask_bytes(), prompt="")
        assert refused.value.trace_id and "prompt" in refused.value.message
        with pytest.raises(TaskFailedError) as failed:
            client.edit(image=b"\x89PNG\r\n\x1a\n" + b"not really", mask=mask_bytes(), prompt="x")
        assert failed.value.code == "bad_request" and "image_url" in failed.value.message
        with pytest.raises(NotImplementedOnServerError):
            client.edit(
                image=png_bytes(), mask=mask_bytes(), prompt="x", extra={"action": "upscale"}
            )


def test_stream_against_the_served_app(live_server: LiveServer) -> None:
    with Client(base_url=live_server.url, token=TOKEN, poll_interval=0.05) as client:
        items = list(client.stream(image=png_bytes(), mask=mask_bytes(), prompt="x", timeout=120))
    assert items[-1].done and items[-1].progress == 100
    assert [i.progress for i in items] == sorted(i.progress for i in items)


def test_in_process_through_testclient(make_app: Any, image_file: Path, mask_file: Path) -> None:
    from fastapi.testclient import TestClient

    with TestClient(make_app()) as http:
        client = Client(
            base_url=str(http.base_url), token=TOKEN, http_client=http, poll_interval=0.05
        )
        result = client.edit(image=image_file, mask=mask_file, prompt="x", timeout=120)
        assert result.done
        assert client.download(result.image_url or "")[:8] == b"\x89PNG\r\n\x1a\n"
