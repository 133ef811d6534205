"""What the benchmarks share, from the base package only (no test suite, no pytest): test
pictures, data: URIs, free ports, an in-thread server, waiting for a server process, and an
engine that holds its device a fixed time."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw

from openedits.engines.base import (
    Capabilities,
    EngineInfo,
    Preset,
    ProgressCallback,
    ShouldCancel,
    never_cancel,
    no_progress,
)
from openedits.errors import TaskCancelled


def make_image(size: tuple[int, int]) -> Image.Image:
    """A deterministic picture with structure: a gradient, a disc and a bar."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    rgb = np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)),
                    np.full((h, w), 96, np.float32)], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((w // 4, h // 4, w // 2, h // 2 + h // 4), fill=(220, 40, 40))
    draw.rectangle((w // 2, h // 3, w - 8, h // 3 + 6), fill=(20, 20, 20))
    return image


def make_photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Photo-like content (smooth shapes plus sensor noise), which compresses like a photo."""
    import cv2

    w, h = size
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 4)
    noisy = base.astype(np.int16) + rng.integers(-6, 7, base.shape, dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def make_mask(size: tuple[int, int]) -> Image.Image:
    """Mode L, 255 over a box around the disc (regenerate), 0 elsewhere (keep)."""
    w, h = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((w // 4 - 2, h // 4 - 2, w // 2 + 2, h // 2 + h // 4 + 2),
                                   fill=255)
    return mask


def png_bytes(image: Image.Image) -> bytes:
    """`image` as a PNG file."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(image: Image.Image) -> str:
    """A data:image/png;base64 URI of `image`."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], *, path: str = "/readyz",
               timeout: float = 60, log: Path | None = None) -> None:
    """Poll `url + path` until it answers 200; RuntimeError if `proc` exits first (with the end
    of its `log`, when given) or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = f": {log.read_text()[-2000:]}" if log is not None else ""
            raise RuntimeError(f"the server exited with {proc.returncode}{tail}")
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer {path} within {timeout:g} s")


@contextmanager
def serve_in_thread(app: object) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port in this process; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,  # type: ignore[arg-type]
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-bench", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


class FixedTimeEngine:
    """An engine that holds its device `seconds` per edit (a sleep, so the CPU stays free for
    the rest of the server, as with a GPU), in `steps` steps; records its busy time."""

    name = "fixed-time"

    def __init__(self, seconds: float, steps: int = 4) -> None:
        self.capabilities = Capabilities(needs_mask=False, honours_prompt=True)
        self.seconds, self.steps = seconds, steps
        self.busy = 0.0
        self.edits = 0
        self._device = threading.Lock()

    def load(self, device: str = "auto") -> None:
        """Nothing to load."""

    def info(self) -> EngineInfo:
        """For /healthz."""
        return EngineInfo(name=self.name, device="bench", loaded=True)

    def validate(self, image: Image.Image, mask: Image.Image | None, prompt: str) -> None:
        """Everything goes."""

    def edit(self, image: Image.Image, mask: Image.Image | None, prompt: str, *, n: int,
             seed: int, preset: Preset, on_progress: ProgressCallback = no_progress,
             should_cancel: ShouldCancel = never_cancel) -> list[Image.Image]:
        """Hold the device, then return `n` tinted copies."""
        if not self._device.acquire(blocking=False):
            raise RuntimeError("two jobs on one device at once")
        try:
            t0 = time.perf_counter()
            for step in range(self.steps):
                if should_cancel():
                    raise TaskCancelled("the task was cancelled")
                time.sleep(self.seconds / self.steps)
                on_progress((step + 1) / self.steps)
            self.busy += time.perf_counter() - t0
            self.edits += 1
        finally:
            self._device.release()
        arr = np.asarray(image.convert("RGB"))
        return [Image.fromarray((arr // 2 + 16 * i).astype(np.uint8), "RGB") for i in range(n)]


@contextmanager
def serve_receiver(on_json: Callable[[Any], None]) -> Iterator[str]:
    """An HTTP server on loopback that answers every POST 200 and hands its JSON body to
    `on_json`; yields its URL."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()
            on_json(json.loads(body))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
