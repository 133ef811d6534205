"""`AsyncClient`: the asyncio twin of `Client`, same methods awaited, same wire.

Kept line for line parallel to `_client.py`; the shared logic lives in `_wire.py`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from ._exceptions import APIConnectionError, APIError, OpenEditsClientError
from ._models import EditResult, TaskPage, TaskRecord
from ._sources import ImageSource
from ._wire import (
    DEFAULT_BASE_URL,
    EDITS_PATH,
    NDJSON,
    TASKS_PATH,
    Poller,
    base_headers,
    build_edit_body,
    decode_json,
    failure_from_body,
    is_final_result,
    new_idempotency_key,
    parse_page,
    parse_record,
    parse_result,
    retry_delay,
    same_origin,
    submitted_task_id,
)

__all__ = ["AsyncClient"]

# A plain function or a coroutine function; an awaitable it returns is awaited.
ProgressCallback = Callable[[TaskRecord], object]


class AsyncClient:
    """An asyncio openedits (or hosted Midjourney Edits API) client; see `Client`.

    `transport=` (any httpx transport, e.g. `httpx.MockTransport`) or `http_client=` (an
    `httpx.AsyncClient` you own) are the seams for tests and proxies.
    `timeout` bounds each HTTP request; the `timeout` of `edit`/`wait` bounds the whole task.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
        max_retries: int = 2,
        poll_interval: float = 0.5,
        max_poll_interval: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self._headers = base_headers(token, headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(
            transport=transport, timeout=timeout, follow_redirects=False
        )

    # --- lifecycle

    async def aclose(self) -> None:
        """Close the connection pool (unless it was handed in as `http_client`)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- transport

    async def _send(
        self, method: str, path: str, *, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> Any:
        url = self.base_url + path
        merged = {**self._headers, **(headers or {})}
        attempt = 0
        while True:
            try:
                try:
                    response = await self._http.request(method, url, json=body, headers=merged)
                except httpx.TransportError as exc:
                    raise APIConnectionError(f"no answer from {url}: {exc!r}") from exc
                return decode_json(response)
            except (APIError, APIConnectionError) as exc:
                delay = retry_delay(exc, attempt) if attempt < self.max_retries else None
                if delay is None:
                    raise
                attempt += 1
                await asyncio.sleep(delay)

    async def download(self, url: str) -> bytes:
        """The bytes at `url` (a result file); the token is sent only to the API's own origin."""
        headers = {"accept": "*/*", "user-agent": self._headers["user-agent"]}
        if same_origin(url, self.base_url) and "authorization" in self._headers:
            headers["authorization"] = self._headers["authorization"]
        attempt = 0
        while True:
            try:
                try:
                    response = await self._http.get(url, headers=headers)
                except httpx.TransportError as exc:
                    raise APIConnectionError(f"could not download {url}: {exc!r}") from exc
                if response.status_code >= 400:
                    decode_json(response)  # raises the matching APIError
                return response.content
            except (APIError, APIConnectionError) as exc:
                delay = retry_delay(exc, attempt) if attempt < self.max_retries else None
                if delay is None:
                    raise
                attempt += 1
                await asyncio.sleep(delay)

    # --- edits

    async def submit(
        self,
        image: ImageSource,
        prompt: str,
        *,
        mask: ImageSource | None = None,
        split_images: bool = False,
        mode: str | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """Start an edit and return its task id at once (`async: true`); pair with `wait`."""
        reply = await self._submit(
            image, prompt, mask, split_images, mode, callback_url, idempotency_key, extra
        )
        return submitted_task_id(reply)

    async def _submit(
        self,
        image: ImageSource,
        prompt: str,
        mask: ImageSource | None,
        split_images: bool,
        mode: str | None,
        callback_url: str | None,
        idempotency_key: str | None,
        extra: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        body = build_edit_body(
            image=image,
            prompt=prompt,
            mask=mask,
            split_images=split_images,
            mode=mode,
            callback_url=callback_url,
            asynchronous=True,
            extra=extra,
        )
        # One key for every retry of this submit: openedits then returns the same task
        # instead of starting a second job after a lost reply.
        key = idempotency_key or new_idempotency_key()
        reply: dict[str, Any] = await self._send(
            "POST", EDITS_PATH, body=body, headers={"idempotency-key": key}
        )
        return reply

    async def edit(
        self,
        image: ImageSource,
        prompt: str,
        *,
        mask: ImageSource | None = None,
        split_images: bool = False,
        mode: str | None = None,
        callback_url: str | None = None,
        wait: bool = True,
        timeout: float | None = 600.0,
        on_progress: ProgressCallback | None = None,
        idempotency_key: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> EditResult:
        """Edit `image` (path, URL, bytes or PIL image) as `prompt` says, inside `mask` if given.

        Submits with `async: true` and polls `/midjourney/tasks` rather than holding one HTTP
        request open for the whole edit: proxies and load balancers cut idle connections after
        a minute or so, and a poll survives a server restart. A server that ignores `async` and
        answers with the finished result is accepted as well. `wait=False` returns at once
        with only `task_id` set. Raises `TaskFailedError` if the task fails and
        `WaitTimeoutError` after `timeout` seconds (the task goes on).
        """
        reply = await self._submit(
            image, prompt, mask, split_images, mode, callback_url, idempotency_key, extra
        )
        if is_final_result(reply):
            return parse_result(reply, self)
        task_id = submitted_task_id(reply)
        if not wait:
            return parse_result({"task_id": task_id, "trace_id": reply.get("trace_id")}, self)
        return await self.wait(task_id, timeout=timeout, on_progress=on_progress)

    async def wait(
        self,
        task_id: str,
        *,
        timeout: float | None = 600.0,
        on_progress: ProgressCallback | None = None,
    ) -> EditResult:
        """Poll the task until it ends; `on_progress(record)` is called after every poll.

        Connection failures and 502/503 while polling are waited out until the deadline, since
        the task lives on in the server's store across restarts.
        """
        poller = Poller(
            task_id,
            timeout=timeout,
            interval=self.poll_interval,
            max_interval=self.max_poll_interval,
        )
        while True:
            try:
                record = await self.retrieve(task_id)
            except (APIError, APIConnectionError) as exc:
                if retry_delay(exc, 0) is None:
                    raise
                record = None
            if record is not None and on_progress is not None:
                outcome = on_progress(record)
                if inspect.isawaitable(outcome):
                    await outcome
            result = poller.verdict(record)
            if result is not None:
                return result
            await asyncio.sleep(poller.next_delay())

    async def stream(
        self,
        image: ImageSource,
        prompt: str,
        *,
        mask: ImageSource | None = None,
        split_images: bool = False,
        mode: str | None = None,
        callback_url: str | None = None,
        timeout: float | None = 600.0,
        idempotency_key: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[EditResult]:
        """Submit and yield result bodies as progress rises; the last one is the final result.

        Asks for `application/x-ndjson`. A server that answers plain JSON instead yields its one
        body; a stream that breaks off before the final line is finished by polling.
        """
        body = build_edit_body(
            image=image,
            prompt=prompt,
            mask=mask,
            split_images=split_images,
            mode=mode,
            callback_url=callback_url,
            asynchronous=False,
            extra=extra,
        )
        headers = {
            **self._headers,
            "accept": f"{NDJSON}, application/json;q=0.5",
            "idempotency-key": idempotency_key or new_idempotency_key(),
        }
        url = self.base_url + EDITS_PATH
        task_id: str | None = None
        try:
            async with self._http.stream(
                "POST", url, json=body, headers=headers, timeout=_stream_timeout(timeout)
            ) as response:
                if response.status_code >= 400 or NDJSON not in response.headers.get(
                    "content-type", ""
                ):
                    await response.aread()
                    reply = decode_json(response)
                    if reply.get("success") is False:
                        raise failure_from_body(reply)
                    result = parse_result(reply, self)
                    if result.done:
                        yield result
                        return
                    task_id = submitted_task_id(reply)
                else:
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        if item.get("success") is False:
                            raise failure_from_body(item)
                        result = parse_result(item, self)
                        task_id = result.task_id or task_id
                        yield result
                        if result.done:
                            return
        except (httpx.TransportError, ValueError) as exc:
            if task_id is None:
                raise APIConnectionError(f"the stream from {url} broke off: {exc!r}") from exc
        if task_id is None:
            raise OpenEditsClientError(f"the stream from {url} ended without a task id")
        yield await self.wait(task_id, timeout=timeout)

    # --- tasks

    async def retrieve(
        self, id: str | None = None, *, trace_id: str | None = None
    ) -> TaskRecord | None:
        """The task record by id (or by the submit's trace id); None if there is none."""
        body: dict[str, Any] = {"action": "retrieve"}
        if id is not None:
            body["id"] = id
        if trace_id is not None:
            body["trace_id"] = trace_id
        return parse_record(await self._send("POST", TASKS_PATH, body=body), self)

    async def retrieve_batch(
        self,
        ids: Sequence[str] | None = None,
        *,
        trace_ids: Sequence[str] | None = None,
        offset: int = 0,
        limit: int = 12,
    ) -> TaskPage:
        """Several records by ids or trace ids, or (with neither) this token's latest tasks."""
        body: dict[str, Any] = {"action": "retrieve_batch", "offset": offset, "limit": limit}
        if ids is not None:
            body["ids"] = list(ids)
        if trace_ids is not None:
            body["trace_ids"] = list(trace_ids)
        return parse_page(await self._send("POST", TASKS_PATH, body=body), self)

    async def cancel(self, id: str) -> TaskRecord | None:
        """Ask the server to stop the task at its next step; returns the record as it stands."""
        body = {"action": "cancel", "id": id}
        return parse_record(await self._send("POST", TASKS_PATH, body=body), self)


def _stream_timeout(timeout: float | None) -> httpx.Timeout:
    # Progress lines can be a whole engine step apart, so the read timeout is the task's
    # deadline, not the per-request default.
    return httpx.Timeout(30.0, read=timeout)
