"""AsyncClient: the same wire as Client, awaited (scripted server and the served app)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from openedits.client import (
    AsyncClient,
    AuthenticationError,
    RateLimitError,
    TaskCancelledError,
    TaskFailedError,
    TaskRecord,
    WaitTimeoutError,
)
from tests.client.client_support import (
    TOKEN,
    FakeServer,
    LiveServer,
    mask_bytes,
    png_bytes,
    size_of,
)


class AsyncFake:
    """Wraps the scripted server as an async transport."""

    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        return self.fake.handle(request)


def aclient_for(fake: FakeServer, **kwargs: Any) -> AsyncClient:
    kwargs.setdefault("poll_interval", 0.001)
    kwargs.setdefault("max_poll_interval", 0.005)
    transport = httpx.MockTransport(AsyncFake(fake))
    return AsyncClient(base_url=fake.base_url, token=TOKEN, transport=transport, **kwargs)


async def test_edit_polls_to_the_result_and_awaits_async_callbacks(
    fake: FakeServer, image_file: Path, mask_file: Path, tmp_path: Path
) -> None:
    seen: list[int] = []

    async def on_progress(record: TaskRecord) -> None:
        await asyncio.sleep(0)
        seen.append(record.progress)

    async with aclient_for(fake) as client:
        result = await client.edit(
            image=image_file,
            mask=mask_file,
            prompt="hat",
            split_images=True,
            on_progress=on_progress,
        )
        assert result.done and len(result.sub_image_urls) == 4
        paths = await result.asave(tmp_path / "out")
    assert seen == [0, 40, 80, 100]
    assert [p.name for p in paths] == ["grid.png", "0_0.png", "0_1.png", "0_2.png", "0_3.png"]
    body = fake.bodies("/midjourney/edits")[0]
    assert body["async"] is True and body["mask"].startswith("data:image/png;base64,")


async def test_stream_and_its_failure(fake: FakeServer) -> None:
    async with aclient_for(fake) as client:
        items = [item async for item in client.stream(image=png_bytes(), prompt="x")]
        assert [i.progress for i in items] == [0, 40, 80, 100] and items[-1].done
        fake.fail = {"code": "api_error", "message": "engine broke"}
        with pytest.raises(TaskFailedError, match="engine broke"):
            _ = [item async for item in client.stream(image=png_bytes(), prompt="x")]
    assert "application/x-ndjson" in fake.requests[0].headers["accept"]


async def test_errors_timeouts_and_cancel(fake: FakeServer) -> None:
    envelope = {"success": False, "error": {"code": "too_many_requests", "message": "slow down"}}
    fake.edit_replies.append((429, envelope, {"retry-after": "3"}))
    async with aclient_for(fake, max_retries=0) as client:
        with pytest.raises(RateLimitError) as info:
            await client.submit(image=png_bytes(), prompt="x")
        assert info.value.retry_after == 3.0

        fake.script = [0] * 100_000
        task_id = await client.submit(image=png_bytes(), prompt="x")
        with pytest.raises(WaitTimeoutError):
            await client.wait(task_id, timeout=0.05)
        record = await client.cancel(task_id)
        assert record is not None and record.status == "cancelled"
        with pytest.raises(TaskCancelledError):
            await client.wait(task_id)
        assert await client.retrieve("missing") is None
        page = await client.retrieve_batch(trace_ids=["a"], limit=5)
        assert page.count >= 1
    assert json.loads(fake.requests[-1].content) == {
        "action": "retrieve_batch",
        "offset": 0,
        "limit": 5,
        "trace_ids": ["a"],
    }


async def test_wrong_token(fake: FakeServer) -> None:
    transport = httpx.MockTransport(AsyncFake(fake))
    async with AsyncClient(base_url=fake.base_url, token="bad", transport=transport) as client:
        with pytest.raises(AuthenticationError):
            await client.retrieve_batch()


async def test_against_the_served_app(live_server: LiveServer, tmp_path: Path) -> None:
    async with AsyncClient(base_url=live_server.url, token=TOKEN, poll_interval=0.05) as client:
        results = await asyncio.gather(
            *[
                client.edit(
                    image=png_bytes(),
                    mask=mask_bytes(),
                    prompt=f"p{i}",
                    split_images=True,
                    timeout=120,
                )
                for i in range(3)
            ]
        )
        assert len({r.task_id for r in results}) == 3 and all(r.done for r in results)
        paths = await results[0].asave(tmp_path)
        assert size_of(paths[0]) == (128, 96) and len(paths) == 5
        items = [i async for i in client.stream(image=png_bytes(), mask=mask_bytes(), prompt="s")]
        assert items[-1].done
