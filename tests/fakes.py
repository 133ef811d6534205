"""The test doubles, all in one place: a controllable engine and a recording HTTP receiver."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

from openedits.engines.base import (
    Capabilities,
    EngineInfo,
    Preset,
    ProgressCallback,
    ShouldCancel,
    never_cancel,
    no_progress,
)
from openedits.errors import InvalidInput, TaskCancelled


class FakeEngine:
    """A fast, deterministic engine: variant i paints the masked region a colour from its seed.

    `steps` progress steps, `step_seconds` each; `gate` (if set) blocks before the first step
    until released, so tests can catch a task while it runs; `fail_with` raises instead.
    """

    name = "fake"

    def __init__(self, *, needs_mask: bool = False, steps: int = 4, step_seconds: float = 0.0,
                 fail_with: Exception | None = None) -> None:
        self.capabilities = Capabilities(needs_mask=needs_mask, honours_prompt=True)
        self.steps = steps
        self.step_seconds = step_seconds
        self.fail_with = fail_with
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.calls: list[dict[str, Any]] = []

    def load(self, device: str = "auto") -> None:
        pass

    def info(self) -> EngineInfo:
        return EngineInfo(name=self.name, device="cpu", model="fake", loaded=True)

    def validate(self, image: Image.Image, mask: Image.Image | None, prompt: str) -> None:
        if mask is None and self.capabilities.needs_mask:
            raise InvalidInput("mask is required by the fake engine")
        if mask is not None and mask.size != image.size:
            raise InvalidInput("mask size differs from the image size")

    def edit(self, image: Image.Image, mask: Image.Image | None, prompt: str, *, n: int,
             seed: int, preset: Preset, on_progress: ProgressCallback = no_progress,
             should_cancel: ShouldCancel = never_cancel) -> list[Image.Image]:
        self.calls.append({"size": image.size, "mask": mask is not None, "prompt": prompt,
                           "seed": seed, "preset": preset})
        self.started.set()
        if self.gate is not None:
            self.gate.wait(30)
        # A prompt that says "[slow]" takes five times as long a step: multi-process tests use
        # it for a task that is surely still running when they look.
        step_seconds = self.step_seconds * (5 if "[slow]" in prompt else 1)
        for step in range(self.steps):
            if should_cancel():
                raise TaskCancelled("the task was cancelled")
            if self.fail_with is not None:
                raise self.fail_with
            time.sleep(step_seconds)
            on_progress((step + 1) / self.steps)
        base = np.asarray(image.convert("RGB"))
        region = (np.asarray(mask) >= 128) if mask is not None else np.ones(base.shape[:2], bool)
        out = []
        for i in range(n):
            rng = np.random.default_rng(seed + i)
            colour = rng.integers(0, 256, size=3, dtype=np.uint8)
            arr = base.copy()
            arr[region] = colour
            out.append(Image.fromarray(arr, "RGB"))
        return out


class BrokenEngine(FakeEngine):
    """Raises a non-openedits exception, as a buggy engine would."""

    def __init__(self) -> None:
        super().__init__(fail_with=RuntimeError("CUDA error: out of memory (simulated)"))


@dataclass
class Received:
    """One request a Receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server on loopback that records requests and answers from a script."""

    url: str
    received: list[Received] = field(default_factory=list)
    # Each entry: (status, headers) consumed in order; the last one repeats.
    script: list[tuple[int, dict[str, str]]] = field(default_factory=lambda: [(200, {})])
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    # The body every POST is answered with (a receiver that says a lot, or never stops).
    reply_body: bytes = b""
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.received) >= count, timeout)
        return list(self.received)


@contextmanager
def serve_receiver(on_request: Callable[[Received], None] | None = None) -> Iterator[Receiver]:
    """Run a Receiver on 127.0.0.1 (a free port) for the duration of the block."""
    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            rec = state["r"]
            found = rec.files.get(self.path)
            if found is None:
                self.send_response(404)
                self.end_headers()
                return
            data, ctype = found
            self.send_response(200)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            rec = state["r"]
            length = int(self.headers.get("content-length") or 0)
            item = Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                            self.rfile.read(length))
            status, headers = rec.script.pop(0) if len(rec.script) > 1 else rec.script[0]
            # Recorded before the answer goes out, so a client that has its answer can count
            # on the request being listed already.
            if on_request:
                on_request(item)
            with rec.arrived:
                rec.received.append(item)
                rec.arrived.notify_all()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(rec.reply_body)))
            self.end_headers()
            # A client that had heard enough (callbacks read no 2xx body) may hang up first.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(rec.reply_body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["r"] = Receiver(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state["r"]
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def hanging_listener() -> Iterator[str]:
    """A loopback port that takes connections and never answers (the kernel completes the
    handshake from the listen backlog; nothing ever reads). Yields its URL; on exit the socket
    closes, which resets the connections still waiting."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextmanager
def serve_raw(reply: bytes) -> Iterator[str]:
    """A loopback server that answers each connection with `reply` (raw bytes: a status line,
    headers, perhaps the start of a body) and then holds it open, silent, until exit.
    Yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)
            try:
                conn.recv(65536)
                conn.sendall(reply)
            except OSError:
                pass

    thread = threading.Thread(target=accept, name="raw-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        sock.close()


class FakeClock:
    """A clock for code that takes `clock: Callable[[], float]`: it stands still until told.

    It starts at the real time, so timestamps it stamps (webhook signatures) still verify."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeTorch:
    """Stands in for an imported torch with `devices` CUDA devices (for metrics that read
    device memory only where torch is already in use)."""

    def __init__(self, devices: int = 2, *, initialized: bool = True) -> None:
        outer = self
        self.devices = devices
        self.initialized = initialized

        class _Props:
            total_memory = 80 * 2**30

        class _Cuda:
            @staticmethod
            def is_available() -> bool:
                return outer.devices > 0

            @staticmethod
            def is_initialized() -> bool:
                return outer.initialized

            @staticmethod
            def device_count() -> int:
                return outer.devices

            @staticmethod
            def memory_allocated(i: int) -> int:
                return (i + 1) * 2**30

            @staticmethod
            def memory_reserved(i: int) -> int:
                return (i + 2) * 2**30

            @staticmethod
            def get_device_properties(i: int) -> _Props:
                return _Props()

        self.cuda = _Cuda()


class BrokerDispatcher:
    """A dispatcher that runs nothing here and reports a broker's readiness, as a scale-out
    API node's does (for readiness tests)."""

    name = "fake-broker"

    def __init__(self) -> None:
        self.problem: str | None = None
        self.submitted: list[str] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def submit(self, task_id: str, priority: int) -> None:
        self.submitted.append(task_id)

    def drain(self, grace_seconds: float) -> None:
        pass

    def ready(self) -> str | None:
        return self.problem
