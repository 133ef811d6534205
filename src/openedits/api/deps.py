"""Request dependencies as Annotated aliases: the runtime, the service, the caller, the trace id."""

from __future__ import annotations

import json
from typing import Annotated, Any

from anyio import to_thread
from fastapi import Depends, Request

from openedits.api._bodies import BodyBudget, BodyHold, read_body
from openedits.auth import Caller
from openedits.editing import EditService
from openedits.errors import InvalidInput, describe_value
from openedits.runtime import Runtime

__all__ = [
    "CallerDep",
    "JsonBodyDep",
    "RuntimeDep",
    "ServiceDep",
    "TraceIdDep",
    "get_body_budget",
    "parse_json_object",
    "read_json_bytes",
    "read_json_object",
]


# The lookups below are `async def` on purpose: FastAPI runs a plain `def` dependency in the
# thread pool, a thread hop per dependency per request for what is an attribute read.


async def get_runtime(request: Request) -> Runtime:
    """The process's Runtime."""
    return _runtime(request)


def _runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


async def get_service(request: Request) -> EditService:
    """The edit service."""
    service: EditService = request.app.state.service
    return service


async def get_trace_id(request: Request) -> str:
    """This request's trace id (set by TraceMiddleware)."""
    return str(request.state.trace_id)


async def get_caller(request: Request) -> Caller:
    """Authenticate the bearer token (401 invalid_token when missing or unknown)."""
    service: EditService = request.app.state.service
    header = request.headers.get("authorization")
    caller = service.authenticator.bootstrap_caller(header)
    if caller is not None:
        return caller
    # Stored tokens are looked up in the database: off the event loop.
    return await to_thread.run_sync(service.authenticator.authenticate, header)


def get_body_budget(request: Request) -> BodyBudget:
    """The app's one BodyBudget (made on first use, from the settings)."""
    budget: BodyBudget | None = getattr(request.app.state, "bodies", None)
    if budget is None:
        settings = _runtime(request).settings
        budget = BodyBudget(settings.max_body_bytes_in_flight, settings.body_wait_seconds)
        request.app.state.bodies = budget
    return budget


async def read_json_object(request: Request, hold: BodyHold | None = None) -> dict[str, Any]:
    """The body as a JSON object, size-capped; `null` values dropped (they count as absent).

    The body is buffered under the app's BodyBudget: in `hold` when given (the caller keeps
    the room until it has done with the body), else in a hold of its own, given back once the
    body is parsed.
    """
    if hold is None:
        async with get_body_budget(request).hold() as own:
            return await read_json_object(request, own)
    raw = await read_json_bytes(request, hold)
    # Parsing and walking a large body takes CPU time: off the event loop, so one client's
    # megabytes never stall every other request, stream and health check.
    return await to_thread.run_sync(parse_json_object, raw)


async def read_json_bytes(request: Request, hold: BodyHold) -> bytes:
    """The body's bytes, size-capped and decoded, for parse_json_object (in a thread)."""
    return await read_body(request, hold, _runtime(request).settings.max_body_bytes)


async def _json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object (see read_json_object)."""
    return await read_json_object(request)


def parse_json_object(chunks: bytes) -> dict[str, Any]:
    """Decode and check a body: a JSON object, not too deep, with strings any store can keep,
    `null` values dropped. Takes CPU time on a large body: call it off the event loop."""
    if not chunks or chunks.isspace():
        raise InvalidInput("the body is empty; send a JSON object such as {\"image_url\": …}")
    try:
        body = json.loads(chunks, parse_constant=_refuse_constant)
    except RecursionError:
        # The C decoder recurses once per level: a body of 100,000 `[` would otherwise
        # escape as a 500 instead of being the client's error.
        raise InvalidInput(
            f"the body nests JSON far deeper than {MAX_JSON_DEPTH} levels; send a flat JSON "
            "object such as {\"image_url\": …, \"prompt\": …}"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(
            f"the body is not valid JSON ({exc}); send a JSON object with content-type "
            "application/json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidInput(f"the body must be a JSON object, got {describe_value(body)}")
    _check_tree(body)
    return {k: v for k, v in body.items() if v is not None}


MAX_JSON_DEPTH = 32
"""How deeply a body may nest. Real bodies nest 2 levels; the bound keeps later work on the body
(validation messages, hashing, storing it as JSON) far from the interpreter's recursion limit."""


def _refuse_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which are not JSON: kept in a task's request, they
    # would make every later reply that carries it unrenderable (and PostgreSQL refuses them).
    raise InvalidInput(
        f"the body is not valid JSON: {name} is not a JSON number; send a finite number or null"
    )


def _where(path: list[str | int]) -> str:
    """A JSON path for a message, `prompt` or `extra[0][0]…`, trimmed when deep."""
    text = ""
    for i, part in enumerate(path):
        if i == 6:
            return text + "…"
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + describe_value(part, 40).strip("'")
    return text


def _text_problem(text: str) -> str | None:
    """Why a string cannot be kept, or None: NUL and unpaired surrogates break storage."""
    if "\x00" in text:
        return "a NUL character (\\u0000)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "an unpaired UTF-16 surrogate (a \\ud800-\\udfff escape on its own)"
    return None


_Node = tuple[Any, str | int] | None
"""A parent link (parent node, key): paths are rebuilt only for an error message."""


def _path(node: _Node) -> list[str | int]:
    path: list[str | int] = []
    while node is not None:
        node, key = node
        path.append(key)
    return path[::-1]


def _check_tree(body: dict[str, Any]) -> None:
    """Refuse bodies nested deeper than MAX_JSON_DEPTH, and strings no store can keep.

    Walks without recursion, so the check itself cannot hit the recursion limit, and keeps
    only a parent link per item, so a body of millions of items costs no path copies.
    """
    stack: list[tuple[Any, int, _Node]] = [(body, 0, None)]
    while stack:
        value, depth, node = stack.pop()
        if depth > MAX_JSON_DEPTH:
            path = _path(node)
            raise InvalidInput(
                f"the body nests deeper than {MAX_JSON_DEPTH} levels (at {_where(path)}); "
                "send a flat JSON object such as {\"image_url\": …, \"prompt\": …}"
            )
        if isinstance(value, str):
            problem = _text_problem(value)
            if problem is not None:
                raise InvalidInput(
                    f"{_where(_path(node)) or 'the body'} contains {problem}; remove it and "
                    "send plain text"
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                problem = _text_problem(key)
                if problem is not None:
                    where = _where(_path(node))
                    raise InvalidInput(
                        f"the body has a key {describe_value(key, 40)}"
                        f"{' in ' + where if where else ''} that contains {problem}; "
                        "send valid Unicode text"
                    )
                stack.append((item, depth + 1, (node, key)))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, (node, i)) for i, item in enumerate(value))


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ServiceDep = Annotated[EditService, Depends(get_service)]
TraceIdDep = Annotated[str, Depends(get_trace_id)]
CallerDep = Annotated[Caller, Depends(get_caller)]
JsonBodyDep = Annotated[dict[str, Any], Depends(_json_body)]
