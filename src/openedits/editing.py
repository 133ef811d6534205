"""EditService: accepting an edit (validate, store, dispatch), waiting for it, and reading tasks."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from anyio import to_thread
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

from openedits._ids import new_task_id
from openedits._net import NetPolicy, check_url
from openedits.auth import Authenticator, Caller
from openedits.errors import (
    EngineFailed,
    InvalidInput,
    NotImplementedOnServer,
    PromptRefused,
    ServerBusy,
    ShuttingDown,
    SyncTimeout,
    TaskCancelled,
    describe_value,
    validation_message,
)
from openedits.intake import Source, bounded_request, check_source, check_url_syntax, request_hash
from openedits.lifecycle import Lifecycle
from openedits.records import failure_body, task_record
from openedits.runtime import Runtime
from openedits.schemas import EditCreate, TasksRequest, TaskState
from openedits.store.tasks import PRIORITY, NewTask, TaskRow
from openedits.workers.dispatch import Dispatcher
from openedits.workers.events import TaskEvent, TaskFinished, TaskProgress

__all__ = ["EditService", "digest_request"]

_SOURCE_FIELDS = (("image_url", False), ("mask", True))  # (field, bare base64 allowed)
_MAX_OFFSET = 2**62


def digest_request(body: dict[str, Any]) -> dict[str, Any]:
    """The body as the task record keeps it: inline images as digests, unknown keys bounded."""
    return bounded_request(body, {})


def _light(edit: EditCreate, sources: dict[str, Source]) -> EditCreate:
    """The checked edit without its megabytes: inline inputs as digests, no unknown keys."""
    values = {name: getattr(edit, name) for name in EditCreate.model_fields}
    for name, source in sources.items():
        values[name] = source.recorded()
    return EditCreate.model_construct(**values)


class EditService:
    """The edit use cases behind the routes; knows nothing of HTTP."""

    def __init__(
        self,
        rt: Runtime,
        dispatcher: Dispatcher,
        authenticator: Authenticator,
        *,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.rt = rt
        self.dispatcher = dispatcher
        self.authenticator = authenticator
        self.lifecycle = lifecycle
        self._moderation = [
            re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in rt.settings.moderation_list
        ]

    # --- submit

    def parse(self, body: dict[str, Any]) -> EditCreate:
        """Validate a submit body; every refusal names the field, the value and the rule."""
        action = body.get("action", "generate")
        if isinstance(action, str) and action != "generate":
            raise NotImplementedOnServer(
                f"action {describe_value(action)} is not implemented; "
                "POST /midjourney/edits serves only action 'generate'"
            )
        try:
            edit = EditCreate.model_validate(body)
        except ValidationError as exc:
            raise InvalidInput(validation_message(list(exc.errors()))) from None
        limit = self.rt.settings.max_prompt_chars
        if not edit.prompt.strip():
            raise InvalidInput("prompt is empty; describe what the edited image should show")
        if len(edit.prompt) > limit:
            raise InvalidInput(
                f"prompt is {len(edit.prompt):,} characters; at most {limit:,} are allowed"
            )
        for pattern in self._moderation:
            if pattern.search(edit.prompt):
                raise PromptRefused(
                    f"prompt contains {pattern.pattern[2:-2].replace(chr(92), '')!r}, "
                    "a word this server's moderation list refuses"
                )
        caps = self.rt.engine.capabilities
        if caps.needs_mask and edit.mask is None:
            raise InvalidInput(
                f"mask is required by the {self.rt.engine.name} engine (it removes what the mask "
                "covers); send a mask (white = regenerate, black = keep), or configure a "
                "diffusion model with OPENEDITS_DIFFUSERS_MODEL to edit from the prompt alone"
            )
        if edit.callback_url is not None:
            url = check_url_syntax(edit.callback_url, field="callback_url")
            check_url(url, field="callback_url", policy=NetPolicy.from_settings(self.rt.settings))
        return edit

    def sources(self, edit: EditCreate) -> dict[str, Source]:
        """image_url and mask checked alike: URLs by their syntax, inline inputs decoded (a
        bad or oversized one is refused now, before any task exists)."""
        checked = {}
        for name, bare in _SOURCE_FIELDS:
            value = getattr(edit, name)
            if value is not None:
                checked[name] = check_source(
                    value, field=name, allow_bare_base64=bare, fetcher=self.rt.fetcher
                )
        return checked

    def submit(
        self,
        body: dict[str, Any],
        caller: Caller,
        *,
        trace_id: str,
        base_url: str,
        idempotency_key: str | None = None,
    ) -> tuple[TaskRow, EditCreate]:
        """Accept an edit: store it pending, then hand it to the dispatcher. Returns the task
        and the edit as checked, light: inline inputs as their digests and no unknown keys,
        so a caller that waits for the task holds none of the body's megabytes.

        With an Idempotency-Key, a retry of the same body returns the first task; the same
        key with another body is refused, so a client bug cannot silently drop an edit.
        """
        caller.require("edits")
        edit = self.parse(body)
        sources = self.sources(edit)
        light = _light(edit, sources)
        store = self.rt.store
        digest = None
        if idempotency_key is not None:
            if not idempotency_key.strip():
                # Most likely an unset template variable; as a key it would tie every later
                # submit of this token to the first one.
                raise InvalidInput(
                    "the Idempotency-Key header is empty; send a unique string per edit (a UUID "
                    "works) or leave the header out"
                )
            if len(idempotency_key) > 255:
                raise InvalidInput("the Idempotency-Key header is over 255 characters")
            digest = request_hash(body, sources)
            existing = store.get_by_idempotency_key(caller.token_id, idempotency_key)
            if existing is not None:
                return self._same_request(existing, digest, idempotency_key), light
        new = NewTask(
            id=new_task_id(),
            owner=caller.token_id,
            trace_id=trace_id,
            request=bounded_request(body, sources),
            priority=PRIORITY[edit.mode],
            base_url=self.rt.settings.public_url or base_url,
            callback_url=edit.callback_url.strip() if edit.callback_url else None,
            idempotency_key=idempotency_key,
            request_hash=digest,
        )
        inline = {name: s.inline for name, s in sources.items() if s.inline is not None}
        try:
            row = store.create(new, body, inline=inline, queue_max=self.rt.settings.queue_max)
        except OperationalError as exc:
            # The database is locked or unreachable for longer than its timeout: an overload
            # the client can retry, not a server fault.
            raise ServerBusy(
                f"the task store could not take the task now ({type(exc.orig).__name__}); "
                "retry shortly",
                retry_after=2,
            ) from None
        except Exception as exc:
            if idempotency_key is None or not store.is_duplicate_key_error(exc):
                raise
            # A concurrent retry with the same key won the insert; answer with its task.
            existing = store.get_by_idempotency_key(caller.token_id, idempotency_key)
            if existing is None:
                raise
            assert digest is not None
            return self._same_request(existing, digest, idempotency_key), light
        self.dispatcher.submit(row.id, row.priority)
        return row, light

    @staticmethod
    def _same_request(existing: TaskRow, request_hash: str, key: str) -> TaskRow:
        if existing.request_hash != request_hash:
            raise InvalidInput(
                f"Idempotency-Key {describe_value(key)} was already used for task {existing.id} "
                "with a different body; use a new key for a new edit"
            )
        return existing

    async def follow(
        self,
        task_id: str,
        timeout: float,
        *,
        is_gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> AsyncIterator[int | TaskRow]:
        """Yield the task's progress each time it rises, then its ended row.

        Progress events carry their value and need no store read; any other wake (start,
        finish, a quiet second) re-reads the row, which also covers events missed before the
        watch began and workers in other processes. Stops early, yielding nothing more, when
        `is_gone()` says the client has left. Raises SyncTimeout after `timeout` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = -1
        with self.rt.bus.watch(task_id) as watch:
            event: TaskEvent | None = None
            while True:
                if isinstance(event, TaskProgress):
                    progress = event.progress
                else:
                    row = await to_thread.run_sync(self.rt.store.get, task_id)
                    if row is None:
                        raise EngineFailed(f"task {task_id} vanished from the store")
                    if row.state.is_terminal():
                        yield row
                        return
                    self._check_draining(row)
                    progress = row.progress
                if progress > last:
                    last = progress
                    yield progress
                if is_gone is not None and await is_gone():
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise SyncTimeout(
                        f"task {task_id} did not finish within {timeout:.0f} s; it goes on: "
                        "poll POST /midjourney/tasks with this id, or submit with async: true"
                    )
                event = await watch.next(min(remaining, 1.0))

    def _check_draining(self, row: TaskRow) -> None:
        """While this process drains, a waiter is answered (503, with the task id) as soon as
        its task cannot end here: at once for a pending one (nothing is claimed any more),
        after the drain for a running one (it had the grace period to finish)."""
        lc = self.lifecycle
        if lc is None or not lc.draining.is_set():
            return
        if lc.closed.is_set() or row.state is TaskState.pending:
            raise ShuttingDown(
                f"this server is shutting down; task {row.id} is kept and goes on (another "
                "worker, or this server after its restart, runs it): poll POST "
                "/midjourney/tasks with this id for its result",
                retry_after=5,
            )

    async def wait(
        self,
        task_id: str,
        timeout: float,
        *,
        is_gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> TaskRow | None:
        """Hold until the task ends; None when the client left first (the task goes on)."""
        async for item in self.follow(task_id, timeout, is_gone=is_gone):
            if isinstance(item, TaskRow):
                return item
        return None

    # --- tasks

    def retrieve(self, caller: Caller, request: TasksRequest) -> dict[str, Any]:
        """One record by id or trace_id, or {} when there is none the caller may see."""
        caller.require("tasks")
        owner = None if caller.is_admin else caller.token_id
        if request.id is not None:
            row = self.rt.store.get(request.id, owner=owner)
        elif request.trace_id is not None:
            row = self.rt.store.get_by_trace(request.trace_id, owner=owner)
        else:
            raise InvalidInput("retrieve needs `id` (a task id) or `trace_id`")
        return task_record(row) if row else {}

    def retrieve_batch(self, caller: Caller, request: TasksRequest) -> dict[str, Any]:
        """A page of records: by ids, by trace_ids, or the caller's most recent."""
        caller.require("tasks")
        owner = None if caller.is_admin else caller.token_id
        rows, count = self.rt.store.page(
            owner=owner,
            ids=request.ids,
            trace_ids=request.trace_ids,
            # Any non-negative offset is valid, but databases take 64-bit ones at most; every
            # offset from 2**62 on is past the end of any real table, so it reads as that.
            offset=min(request.offset, _MAX_OFFSET),
            limit=request.limit,
        )
        return {"items": [task_record(r) for r in rows], "count": count}

    def cancel(self, caller: Caller, request: TasksRequest) -> dict[str, Any]:
        """Stop a task: a pending one at once, a running one at its next engine step."""
        caller.require("tasks")
        if request.id is None:
            raise InvalidInput("cancel needs `id`, the task id to cancel")
        owner = None if caller.is_admin else caller.token_id
        row = self.rt.store.get(request.id, owner=owner)
        if row is None:
            return {}
        if row.state is TaskState.pending:
            self._cancel_pending(row)
        elif row.state is TaskState.running:
            self.rt.store.request_cancel(row.id)
        updated = self.rt.store.get(row.id)
        return task_record(updated) if updated else {}

    def _cancel_pending(self, row: TaskRow) -> None:
        error = TaskCancelled("the task was cancelled before it started")
        body = failure_body(row.id, row.trace_id, error)
        if self.rt.store.finish(row.id, TaskState.cancelled, body, error_status=error.status_code):
            self.rt.bus.publish(TaskFinished(row.id, TaskState.cancelled))
        elif (current := self.rt.store.get(row.id)) and current.state is TaskState.running:
            # A worker claimed it between our read and our write: stop it at its next step.
            self.rt.store.request_cancel(row.id)
