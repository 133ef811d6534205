"""A flood of unfinished connections against a real `openedits serve`: what other clients see.

Starts `openedits serve` (OPENEDITS_MAX_CONNECTIONS=500, a 5 s head deadline), opens N sockets
that send nothing or half a header line, then prints: a client connected before the flood (its
/healthz latency), a new client during it (503 server_busy and how fast), how many of the N
sockets the server has closed by the head deadline plus 5 s, and a new client afterwards.

    ulimit -n 8192; .venv/bin/python bench/connections.py [--sockets 2000]
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import ServerProcess, free_port  # noqa: E402

HEAD_TIMEOUT = 5.0


def _ms(started: float) -> str:
    return f"{1000 * (time.monotonic() - started):.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sockets", type=int, default=2000)
    n = parser.parse_args().sockets
    port = free_port()
    env = {"OPENEDITS_DATA_DIR": tempfile.mkdtemp(), "OPENEDITS_API_TOKENS": "bench",
           "OPENEDITS_LOG_LEVEL": "WARNING", "OPENEDITS_MAX_CONNECTIONS": "500",
           "OPENEDITS_HEADER_TIMEOUT_SECONDS": str(HEAD_TIMEOUT)}
    argv = [sys.executable, "-c", "from openedits.cli import main; main()", "serve",
            "--port", str(port)]
    server = ServerProcess(env, port, argv)
    socks: list[socket.socket] = []
    try:
        server.wait_healthy()
        with httpx.Client(base_url=server.url, timeout=10) as early:
            early.get("/healthz")
            opened = time.monotonic()
            for i in range(n):
                sock = socket.create_connection(("127.0.0.1", port))
                socks.append(sock)
                if i % 2:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127")
            print(f"opened {n} unfinished connections in {time.monotonic() - opened:.2f} s")
            started = time.monotonic()
            r = early.get("/healthz")
            print(f"client connected before the flood: {r.status_code} in {_ms(started)}")
        started = time.monotonic()
        r = httpx.get(server.url + "/healthz", timeout=10)
        code = r.json().get("error", {}).get("code", "") if r.status_code != 200 else ""
        print(f"new client during the flood: {r.status_code} {code} "
              f"(Retry-After {r.headers.get('retry-after')}) in {_ms(started)}")
        deadline = opened + HEAD_TIMEOUT + 5
        closed = 0
        for sock in socks:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                closed += sock.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
        print(f"closed by the server within the head deadline + 5 s: {closed}/{n}")
        started = time.monotonic()
        r = httpx.get(server.url + "/healthz", timeout=10)
        print(f"new client after the flood: {r.status_code} in {_ms(started)}")
    finally:
        for sock in socks:
            sock.close()
        server.stop()


if __name__ == "__main__":
    main()
