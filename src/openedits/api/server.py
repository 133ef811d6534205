"""The HTTP server: uvicorn with deadlines for request heads and bodies and a cap on connections.

uvicorn closes an idle keep-alive connection (`timeout_keep_alive`), but a connection that never
sends a complete request head is kept forever: its keep-alive timer is armed only after a reply,
and any byte received cancels it. Enough such sockets (no token needed) exhaust the process's
file descriptors, and then every client fails. `GuardedHttpToolsProtocol` is uvicorn's own
httptools protocol with three additions:

- a *head deadline*: from the moment a connection opens, or its last reply ends, it has
  `OPENEDITS_HEADER_TIMEOUT_SECONDS` to deliver a whole request head (trickling bytes does not
  extend it), and at most `MAX_HEAD_BYTES` of it; else it is closed;
- a *body deadline*: a request whose body stops arriving for `OPENEDITS_BODY_TIMEOUT_SECONDS` is
  closed (the app sees the client as gone);
- a *connection cap*: past `OPENEDITS_MAX_CONNECTIONS` open connections a new one is answered at
  once with `503 server_busy` in the contract's envelope and `Retry-After`, then closed, so the
  cap reached is a fast refusal, never a hang, and connections already open keep being served.

uvicorn's own `limit_concurrency` is not used: its refusal is a plain-text body without
`Retry-After`, and it counts in-flight requests only once their head has arrived.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from openedits._ids import new_trace_id
from openedits.api._drain import DrainingServer, shutdown_timeout
from openedits.errors import ServerBusy
from openedits.records import envelope
from openedits.settings import Settings

__all__ = [
    "MAX_HEAD_BYTES",
    "ConnectionLimits",
    "GuardedHttpToolsProtocol",
    "raise_open_file_limit",
    "run_server",
    "server_config",
]

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
"""The most a request line and headers may take; real heads are well under 8 KB."""

REFUSAL_WINDOW = 1.0
"""Seconds an over-cap connection gets to send its head before it is closed unanswered: long
enough for a real client's request to arrive, so it can read why it was refused."""

FILE_RESERVE = 128
"""Descriptors kept free of connections for the database, result files, logs and threads."""

_CAP_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    """What one server process allows its connections."""

    max_connections: int = 1000
    header_timeout: float = 10.0
    body_timeout: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        """The limits OPENEDITS_MAX_CONNECTIONS and the timeout settings describe."""
        return cls(
            max_connections=settings.max_connections,
            header_timeout=settings.header_timeout_seconds,
            body_timeout=settings.body_timeout_seconds,
        )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head and body deadlines and a connection cap.

    Subclass it with `limits` set (`protocol_for` does), and pass the class as uvicorn's `http`.
    """

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    _last_cap_log: ClassVar[float] = -_CAP_LOG_INTERVAL

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._awaiting_head = True
        self._head_bytes = 0
        self._refusing = False

    # --- deadlines

    def _arm(self, seconds: float, callback: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _await_head(self, seconds: float) -> None:
        self._awaiting_head = True
        self._arm(seconds, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:
            # Reading is paused because the app has not consumed what arrived: the client is
            # not the slow one, so wait for the app instead of cutting it off.
            self._arm(self.limits.body_timeout, self._body_timed_out)
            return
        log.info("closing a connection whose request body stalled for %g s",
                 self.limits.body_timeout)
        self.transport.close()

    # --- uvicorn's protocol hooks

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refusing = True
            now = time.monotonic()
            if now - GuardedHttpToolsProtocol._last_cap_log >= _CAP_LOG_INTERVAL:
                GuardedHttpToolsProtocol._last_cap_log = now
                log.warning("connection cap reached (%d open, OPENEDITS_MAX_CONNECTIONS=%d): "
                            "new connections get 503", len(self.connections),
                            self.limits.max_connections)
            self._await_head(min(REFUSAL_WINDOW, self.limits.header_timeout))
        else:
            self._await_head(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        counting = self._awaiting_head
        super().data_received(data)
        # Counted after parsing: a chunk that completes a head (and carries body bytes) is fine.
        if counting and self._awaiting_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._disarm()
                self.send_400_response(
                    f"Request head over {MAX_HEAD_BYTES} bytes; send smaller headers."
                )

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_bytes = 0
        self._arm(self.limits.body_timeout, self._body_timed_out)
        if not self._refusing:
            super().on_headers_complete()
            return
        app, self.app = self.app, _refusal(self.limits.max_connections)
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_body(self, body: bytes) -> None:
        if not self._awaiting_head and not self.cycle.response_complete:
            # A body still arriving after its reply (an early 413) is not waited for: the
            # head deadline armed by that reply closes the connection.
            self._arm(self.limits.body_timeout, self._body_timed_out)
        super().on_body(body)

    def on_message_complete(self) -> None:
        # The request is in; the app's time is its own. Bytes from here on are the next
        # (pipelined) request's head: counted against MAX_HEAD_BYTES, and timed once the
        # reply to this one is out.
        self._disarm()
        self._awaiting_head = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            # The next request's head has the same deadline as the first one's.
            self._await_head(self.limits.header_timeout)


def _refusal(limit: int) -> Any:
    """The app that answers a connection over the cap: 503 server_busy, Retry-After, close."""

    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        trace_id = new_trace_id()
        error = ServerBusy(
            f"the server is at its limit of {limit} open connections; retry in 1 s "
            "(Retry-After). The operator can raise OPENEDITS_MAX_CONNECTIONS",
            retry_after=1,
        )
        body = json.dumps(envelope(error.code, error.message, trace_id)).encode()
        await send({
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", error.headers["Retry-After"].encode()),
                (b"x-trace-id", trace_id.encode()),
                (b"connection", b"close"),
            ],
        })
        await send({"type": "http.response.body", "body": body})

    return refuse


def protocol_for(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """A protocol class bound to `limits`, for uvicorn's `http` option."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit where allowed; returns
    the soft limit now in force. Connections are files: the default 1,024 is soon spent."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.info("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return int(soft)


def server_config(app: Any, settings: Settings, *, host: str, port: int,
                  open_files: int | None = None, **extra: Any) -> uvicorn.Config:
    """uvicorn's Config for `app` with openedits' connection limits. `open_files` (the soft
    limit in force) caps OPENEDITS_MAX_CONNECTIONS so that connections alone cannot spend
    every descriptor."""
    limits = ConnectionLimits.from_settings(settings)
    if open_files is not None and limits.max_connections > open_files - FILE_RESERVE:
        room = max(1, open_files - FILE_RESERVE)
        log.warning("OPENEDITS_MAX_CONNECTIONS=%d is over what %d open files allow; using %d",
                    limits.max_connections, open_files, room)
        limits = ConnectionLimits(room, limits.header_timeout, limits.body_timeout)
    options: dict[str, Any] = {
        "log_level": settings.log_level.lower(),
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        # Logging is configured by the caller (text or JSON) and uvicorn's lines go through it;
        # the app writes its own access lines (with the duration and the trace id).
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": _graceful_seconds(app),
        "timeout_keep_alive": settings.keep_alive_seconds,
        **extra,
    }
    return uvicorn.Config(app, host=host, port=port, http=protocol_for(limits), **options)


def _graceful_seconds(app: Any) -> int:
    # uvicorn's own graceful shutdown must outlast the app's drain (see api/_drain.py).
    lifecycle = getattr(getattr(app, "state", None), "lifecycle", None)
    return shutdown_timeout(lifecycle) if lifecycle is not None else 10


def run_server(app: Any, settings: Settings, *, host: str, port: int) -> None:
    """Serve `app` (built by create_app) until a signal drains and stops it (what `openedits
    serve` runs)."""
    open_files = raise_open_file_limit()
    config = server_config(app, settings, host=host, port=port, open_files=open_files)
    DrainingServer.for_app(app, config).run()
