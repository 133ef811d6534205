"""Async submit throughput of openedits against a bare FastAPI endpoint that only parses the body.

Starts three real uvicorn servers on loopback, side by side and with the same uvicorn settings
(one process each): a bare FastAPI app whose endpoint only parses the JSON body and answers a
small object; the same bare app that also writes the body's two inline texts to a file before it
answers (the least any durable submit does); and the real openedits app (SQLite in a temporary
folder, its real store, routes, authentication and middleware). All get the same body: a 512 px
photo and its mask inline as data: URIs (about 600 KB of JSON) with `async: true`. 32 clients on
keep-alive connections send a fixed number of requests to each server in turn, several rounds;
the best round of each is printed as requests per second, with the ratios openedits / bare (goal:
>= 0.8) and openedits / durable.

    .venv/bin/python bench/submit.py [--requests 600] [--clients 32] [--rounds 3]
                                     [--dispatch instant|held|workers]

What happens to a task after its submit is chosen with --dispatch; every accepted task is written
to the store before its reply either way, and the run ends by counting the stored tasks against
the accepted replies.
- `instant` (default): a stand-in for a fleet of instant engines ends each task (cancelled, from
  one thread) right after it is stored, so the store runs in its steady state: a task's inputs
  are deleted when it ends and their pages are reused by later submits, and the queue stays
  short. No engine competes for the CPU; the ends' writes do, as real workers' would.
- `held`: tasks stay pending, so the database file grows by every body (about 600 KB) and the
  queue by every task: the worst case, a server whose queue only fills.
- `workers`: openedits' real in-process workers and engine (they compete for the CPU, and fall
  behind: the queue fills to OPENEDITS_QUEUE_MAX).

The load generator is raw asyncio sockets with the request bytes built once, so the client costs
far less CPU than either server. Runs from what `./scripts/serve` installs (no tests, no pytest).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _support import free_port
from fastapi import FastAPI, Request
from PIL import Image, ImageDraw

TOKEN = "bench-token"
PATH = "/midjourney/edits"


# --- the body


def _photo(size: int) -> bytes:
    """A photo-like PNG: smooth shapes plus fine noise, so it compresses like a photo does."""
    rng = np.random.default_rng(7)
    x = np.linspace(0, 1, size, dtype=np.float32)
    base = np.stack([np.outer(np.ones(size), x), np.outer(x, np.ones(size)),
                     np.outer(x, x)], axis=-1) * 200
    noise = rng.normal(0, 6, (size, size, 3))
    rgb = np.clip(base + noise + 20, 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, size // 2, size * 3 // 4),
                                  fill=(200, 60, 40))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _mask(size: int) -> bytes:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((size // 4 - 4, size // 4 - 4, size // 2 + 4,
                                    size * 3 // 4 + 4), fill=255)
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


def make_body(size: int) -> bytes:
    """The submit body every request sends."""
    uri = "data:image/png;base64,"
    body = {
        "image_url": uri + base64.b64encode(_photo(size)).decode(),
        "mask": uri + base64.b64encode(_mask(size)).decode(),
        "prompt": "a red hat on the table",
        "async": True,
    }
    return json.dumps(body).encode()


def make_request(port: int, body: bytes) -> bytes:
    head = (
        f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"authorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\n"
        f"accept: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# --- the servers (this file, run with --serve)


def _serve_bare(port: int) -> None:
    import uvicorn

    app = FastAPI()

    @app.post(PATH)
    async def edits(request: Request) -> dict[str, Any]:
        body = await request.json()
        return {"success": True, "task_id": str(len(body)), "trace_id": "bare"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _serve_bare_durable(port: int, data_dir: str) -> None:
    """The bare endpoint plus the least a durable submit must do: the body's two inline texts
    written to a file before the reply (page cache, as openedits' own input files: a `kill -9`
    loses nothing). Each file is deleted 256 requests later, as ended tasks' inputs are.
    Writing them into SQLite instead (WAL, synchronous=NORMAL) measured slower here: about
    200 req/s against 420."""
    import itertools

    import uvicorn
    from anyio import to_thread

    app = FastAPI()
    folder = Path(data_dir) / "bare-inputs"
    folder.mkdir()
    numbers = itertools.count(1)

    def write(body: dict[str, Any]) -> int:
        n = next(numbers)
        with open(folder / str(n), "xb") as f:
            f.write(body["image_url"].encode())
            f.write(body["mask"].encode())
        (folder / str(n - 256)).unlink(missing_ok=True)
        return n

    @app.post(PATH)
    async def edits(request: Request) -> dict[str, Any]:
        body = await request.json()
        n = await to_thread.run_sync(write, body)
        return {"success": True, "task_id": str(n), "trace_id": "bare"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


class _HeldDispatcher:
    """Tasks stay pending in the store: the bench measures submits, not the engine."""

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""

    def submit(self, task_id: str, priority: int) -> None:
        """Leave the task pending."""

    def drain(self, grace_seconds: float) -> None:
        """Nothing runs, so nothing to hand back."""


class _InstantDispatcher(_HeldDispatcher):
    """Ends each task as soon as it is stored, from one thread, as instant engines would."""

    def __init__(self, store: Any) -> None:
        import queue
        import threading

        self.store = store
        self.todo: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.todo.put(None)
        self.thread.join(10)

    def submit(self, task_id: str, priority: int) -> None:
        self.todo.put(task_id)

    def _run(self) -> None:
        from openedits.schemas import TaskState

        while (task_id := self.todo.get()) is not None:
            self.store.finish(task_id, TaskState.cancelled, {"success": False})


def _serve_openedits(port: int, dispatch: str) -> None:
    import uvicorn

    from openedits.api.app import create_app
    from openedits.runtime import Runtime
    from openedits.settings import Settings

    settings = Settings()
    if dispatch == "workers":
        app = create_app(settings)
    else:
        rt = Runtime.build(settings)
        dispatcher = _InstantDispatcher(rt.store) if dispatch == "instant" else _HeldDispatcher()
        app = create_app(settings, runtime=rt, dispatcher=dispatcher)
    # The same uvicorn settings as the bare app, plus what `openedits serve` passes.
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", proxy_headers=True,
                forwarded_allow_ips=settings.forwarded_allow_ips)


class Server:
    """One server process started from this file."""

    def __init__(self, kind: str, env: dict[str, str], dispatch: str) -> None:
        self.kind = kind
        self.port = free_port()
        argv = [sys.executable, __file__, "--serve", kind, str(self.port), "--dispatch", dispatch]
        self.proc = subprocess.Popen(argv, env={**os.environ, **env})

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.kind} server exited {self.proc.returncode}")
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise TimeoutError(f"the {self.kind} server did not start")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used (Linux; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --- the load


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


async def _client(port: int, request: bytes, todo: list[int], statuses: dict[int, int],
                  task_ids: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while todo:
            todo.pop()
            writer.write(request)
            await writer.drain()
            status, body = await _read_reply(reader)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                task_ids.append(json.loads(body)["task_id"])
    finally:
        writer.close()


async def drive(port: int, request: bytes, n: int, clients: int) -> tuple[float, dict[int, int],
                                                                            list[str]]:
    """Send `n` requests over `clients` connections; (requests per second, statuses, ids)."""
    todo = list(range(n))
    statuses: dict[int, int] = {}
    task_ids: list[str] = []
    started = time.perf_counter()
    await asyncio.gather(*(_client(port, request, todo, statuses, task_ids)
                           for _ in range(clients)))
    return n / (time.perf_counter() - started), statuses, task_ids


async def _run(args: argparse.Namespace) -> None:
    body = make_body(args.size)
    print(f"body: {len(body):,} bytes ({args.size} px photo and mask inline), "
          f"{args.clients} clients, {args.requests} requests per round, {args.rounds} rounds, "
          f"dispatch {args.dispatch}")
    with tempfile.TemporaryDirectory() as data:
        env = {
            "OPENEDITS_DATA_DIR": data,
            "OPENEDITS_API_TOKENS": TOKEN,
            "OPENEDITS_RATE_LIMIT": "off",
            "OPENEDITS_QUEUE_MAX": str(10 * args.requests * args.rounds + 1000),
            "OPENEDITS_ENGINE": "opencv",
            "OPENEDITS_LOG_LEVEL": "WARNING",
        }
        servers = [Server(kind, env, args.dispatch) for kind in ("bare", "durable", "openedits")]
        accepted: list[str] = []
        try:
            for server in servers:
                await server.wait_ready()
            requests = {s.kind: make_request(s.port, body) for s in servers}
            best: dict[str, float] = {}
            cpu: dict[str, list[float]] = {s.kind: [] for s in servers}
            for round_ in range(args.rounds + 1):  # round 0 warms both up
                for server in servers:
                    n = args.clients * 2 if round_ == 0 else args.requests
                    before = server.cpu_seconds()
                    rate, statuses, ids = await drive(server.port, requests[server.kind], n,
                                                      args.clients)
                    if round_:
                        cpu[server.kind].append((server.cpu_seconds() - before) / n * 1e3)
                    if server.kind == "openedits":
                        accepted += ids
                    if set(statuses) != {200}:
                        print(f"  {server.kind}: statuses {statuses}")
                    if round_:
                        print(f"  round {round_} {server.kind:9s} {rate:7.1f} req/s  "
                              f"{cpu[server.kind][-1]:.2f} CPU ms per request")
                        best[server.kind] = max(best.get(server.kind, 0.0), rate)
        finally:
            for server in servers:
                server.stop()
        stored = _stored(Path(data) / "openedits.db", accepted)
    ratio = best["openedits"] / best["bare"]
    print(f"bare FastAPI (parse only): {best['bare']:.1f} req/s")
    print(f"bare + durable write:      {best['durable']:.1f} req/s  (the inline texts written to "
          "a file before the reply)")
    print(f"openedits async submit:    {best['openedits']:.1f} req/s")
    print(f"ratio openedits / bare:    {ratio:.2f}  (goal >= 0.8)")
    print(f"ratio openedits / durable: {best['openedits'] / best['durable']:.2f}  "
          "(against a bare endpoint that also keeps the body)")
    lowest = {kind: min(values) for kind, values in cpu.items()}
    if all(lowest.values()):
        print("server CPU per request:    " + ", ".join(
            f"{kind} {ms:.2f} ms" for kind, ms in lowest.items()) + " (lowest round)")
    print(f"durable: {stored} of {len(accepted)} accepted tasks in the store")


def _stored(db: Path, ids: list[str]) -> int:
    with sqlite3.connect(db) as conn:
        have = {row[0] for row in conn.execute("SELECT id FROM tasks")}
    return sum(1 for i in ids if i in have)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="requests per round per server")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=512, help="side of the photo, px")
    parser.add_argument("--dispatch", choices=("instant", "held", "workers"), default="instant",
                        help="what ends the tasks (see the module's docstring)")
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        kind, port = args.serve[0], int(args.serve[1])
        if kind == "bare":
            _serve_bare(port)
        elif kind == "durable":
            _serve_bare_durable(port, os.environ["OPENEDITS_DATA_DIR"])
        else:
            _serve_openedits(port, args.dispatch)
        return
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
