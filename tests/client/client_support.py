"""Helpers for the client tests: small images built in code, a scripted contract server for
`httpx.MockTransport`, and the real app served by uvicorn on loopback."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

from tests.servers import serve_in_thread

TOKEN = "test-token"


def png_bytes(
    size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (40, 120, 200)
) -> bytes:
    """A small RGB PNG with a shape on it, so inpainting has something to work with."""
    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).ellipse(
        (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=(250, 200, 20)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def size_of(source: Path | bytes) -> tuple[int, int]:
    """An image's size, closing the file (pytest turns the ResourceWarning into an error)."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return image.size


def mask_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    """A PNG mask: white (regenerate) square in the middle, black (keep) elsewhere."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(
        (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4), fill=255
    )
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


# --- a scripted contract server for MockTransport -------------------------------------------


@dataclass
class FakeTask:
    id: str
    trace_id: str
    request: dict[str, Any]
    # The progress each successive retrieve reports; the task succeeds after the last one.
    script: list[int] = field(default_factory=lambda: [0, 40, 80])
    polls: int = 0
    fail: dict[str, str] | None = None
    cancelled: bool = False


class FakeServer:
    """Answers the contract like openedits would, from memory, counting every request.

    `edit_replies` lets a test queue raw replies (status, body, headers) for the next submits.
    """

    base_url = "http://api.test"

    def __init__(self) -> None:
        self.tasks: dict[str, FakeTask] = {}
        self.requests: list[httpx.Request] = []
        self.edit_replies: list[tuple[int, Any, dict[str, str]]] = []
        self.script: list[int] = [0, 40, 80]
        self.fail: dict[str, str] | None = None
        self.honour_async = True

    # --- helpers for tests

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.url.path == path]

    def result(self, task: FakeTask) -> dict[str, Any]:
        base = f"{self.base_url}/files/{task.id}"
        split = bool(task.request.get("split_images"))
        return {
            "success": True,
            "task_id": task.id,
            "image_id": "1391372193836826624",
            "image_url": f"{base}/grid.png",
            "image_width": 128,
            "image_height": 96,
            "raw_image_url": f"{base}/grid.png",
            "raw_image_width": 128,
            "raw_image_height": 96,
            "sub_image_urls": [f"{base}/0_{i}.png" for i in range(4)] if split else [],
            "progress": 100,
            "actions": [],
        }

    def record(self, task: FakeTask) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": task.id,
            "type": "edits",
            "trace_id": task.trace_id,
            "request": {k: v for k, v in task.request.items() if k not in ("image_url", "mask")},
            "created_at": 1.0,
            "started_at": None,
            "finished_at": None,
            "elapsed": None,
        }
        step = task.polls
        task.polls += 1
        if task.cancelled:
            record["state"] = "cancelled"
            record["response"] = {
                "success": False,
                "task_id": task.id,
                "trace_id": task.trace_id,
                "error": {"code": "cancelled", "message": "cancelled by the caller"},
            }
        elif step < len(task.script):
            progress = task.script[step]
            record["state"] = "pending" if progress == 0 else "running"
            if progress:
                record["response"] = {"progress": progress}
        elif task.fail is not None:
            record["state"] = "failed"
            record["response"] = {
                "success": False,
                "task_id": task.id,
                "trace_id": task.trace_id,
                "error": task.fail,
            }
            record.update(success=False, error=task.fail)
        else:
            record["state"] = "succeeded"
            record["response"] = self.result(task)
            record.update(success=True, image_url=record["response"]["image_url"])
        return record

    # --- the transport handler

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        trace_id = str(uuid.uuid4())
        if request.url.path.startswith("/files/") or request.url.host != "api.test":
            return httpx.Response(
                200, content=png_bytes((8, 8)), headers={"content-type": "image/png"}
            )
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return self.error(401, "invalid_token", "the token is missing or unknown", trace_id)
        body = json.loads(request.content or b"{}")
        if request.url.path == "/midjourney/edits":
            return self.edits(request, body, trace_id)
        if request.url.path == "/midjourney/tasks":
            return self.tasks_action(body)
        return self.error(404, "not_found", f"no route {request.url.path}", trace_id)

    def edits(self, request: httpx.Request, body: dict[str, Any], trace_id: str) -> httpx.Response:
        if self.edit_replies:
            status, reply, headers = self.edit_replies.pop(0)
            if isinstance(reply, str):
                return httpx.Response(status, text=reply, headers=headers)
            return httpx.Response(status, json=reply, headers=headers)
        task = FakeTask(
            id=str(uuid.uuid4()),
            trace_id=trace_id,
            request=body,
            script=list(self.script),
            fail=self.fail,
        )
        self.tasks[task.id] = task
        if "application/x-ndjson" in request.headers.get("accept", ""):
            lines = [{"success": True, "task_id": task.id, "progress": p} for p in task.script]
            final = (
                {"success": False, "task_id": task.id, "trace_id": trace_id, "error": task.fail}
                if task.fail
                else self.result(task)
            )
            text = "".join(json.dumps(line) + "\n" for line in [*lines, final])
            return httpx.Response(200, text=text, headers={"content-type": "application/x-ndjson"})
        if (body.get("async") and self.honour_async) or body.get("callback_url"):
            return httpx.Response(
                200, json={"success": True, "task_id": task.id, "trace_id": trace_id}
            )
        task.polls = len(task.script)
        return httpx.Response(200, json=self.result(task))

    def tasks_action(self, body: dict[str, Any]) -> httpx.Response:
        action = body.get("action", "retrieve")
        if action == "retrieve":
            task = self.tasks.get(body.get("id", ""))
            return httpx.Response(200, json=self.record(task) if task else {})
        if action == "retrieve_batch":
            ids = body.get("ids") or list(self.tasks)
            items = [self.record(self.tasks[i]) for i in ids if i in self.tasks]
            offset, limit = body.get("offset", 0), body.get("limit", 12)
            return httpx.Response(
                200, json={"items": items[offset : offset + limit], "count": len(items)}
            )
        if action == "cancel":
            task = self.tasks[body["id"]]
            task.cancelled = True
            return httpx.Response(200, json=self.record(task))
        return self.error(400, "api_not_implemented", f"action {action!r}", "t")

    @staticmethod
    def error(
        status: int, code: str, message: str, trace_id: str, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return httpx.Response(
            status,
            json={
                "success": False,
                "error": {"code": code, "message": message},
                "trace_id": trace_id,
            },
            headers={"x-trace-id": trace_id, **(headers or {})},
        )


# --- the real app ---------------------------------------------------------------------------


@dataclass
class LiveServer:
    url: str
    data_dir: Path


@contextmanager
def serve(data_dir: Path, **overrides: Any) -> Iterator[LiveServer]:
    """The real app, engine opencv, served by uvicorn in a thread on a free loopback port."""
    from openedits.api.app import create_app
    from openedits.settings import Settings

    options: dict[str, Any] = {
        "data_dir": data_dir,
        "api_tokens": TOKEN,
        "allow_private_urls": True,
        "engine": "opencv",
        "rate_limit": "10000/minute",
        **overrides,
    }
    with serve_in_thread(create_app(Settings(**options))) as url:
        yield LiveServer(url=url, data_dir=data_dir)
