"""Soak: does a server's memory stay flat over hundreds of sync edits? (goal: growth <= 5%)

Starts a real `openedits serve` process (the opencv engine, SQLite in a temp dir), sends
`--edits` synchronous edits of a `--size` px image with a mask from `--clients` clients, and
prints the server's resident memory after the warm-up edits, every 100 edits, and at the end,
and the growth. Each reading is taken after a short pause with no request in flight, so it shows
what the server keeps, not the buffers of the edits under way.

    .venv/bin/python bench/soak.py [--edits 500] [--warmup 50] [--size 512] [--clients 2]

Needs only what ./scripts/serve installs (no test helpers, no pytest); reads RSS from /proc.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from _support import data_uri, free_port, wait_ready
from PIL import Image, ImageDraw


def _image(size: int) -> Image.Image:
    """A textured picture (flat colour would make inpainting trivially cheap)."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([(x * 255 // size), (y * 255 // size), ((x + y) * 127 // size)], axis=-1)
    noise = rng.integers(0, 40, size=(size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _mask(size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse((size // 3, size // 3, size * 2 // 3, size * 2 // 3), fill=255)
    return mask


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/<pid>/status")


def _settled_rss(pid: int) -> int:
    """RSS once the edits in flight have ended and freed their buffers."""
    time.sleep(_SETTLE_SECONDS)
    return _rss_bytes(pid)


_SETTLE_SECONDS = 1.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()
    if not 0 < args.warmup < args.edits:
        parser.error("--warmup must be at least 1 and fewer than --edits")

    body = {"image_url": data_uri(_image(args.size)), "mask": data_uri(_mask(args.size)),
            "prompt": "soak", "split_images": True}
    headers = {"authorization": "Bearer soak"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OPENEDITS_DATA_DIR": tmp, "OPENEDITS_API_TOKENS": "soak",
               "OPENEDITS_ENGINE": "opencv", "OPENEDITS_RATE_LIMIT": "off",
               "OPENEDITS_LOG_LEVEL": "WARNING"}
        proc = subprocess.Popen(
            [sys.executable, "-c", "from openedits.cli import main; main()", "serve",
             "--port", str(port)], env=env, stdout=subprocess.DEVNULL)
        try:
            wait_ready(url, proc)
            with httpx.Client(base_url=url, timeout=120, headers=headers) as client:

                def edit(_: int) -> float:
                    started = time.perf_counter()
                    r = client.post("/midjourney/edits", json=body)
                    r.raise_for_status()
                    return time.perf_counter() - started

                with ThreadPoolExecutor(args.clients) as pool:
                    list(pool.map(edit, range(args.warmup)))
                    warm = _settled_rss(proc.pid)
                    print(f"{args.warmup:5d} edits: RSS {warm / 2**20:.1f} MiB (after warm-up)",
                          flush=True)
                    seconds: list[float] = []
                    elapsed = 0.0
                    done = args.warmup
                    while done < args.edits:
                        batch = min(100 - done % 100, args.edits - done)
                        started = time.perf_counter()
                        seconds += pool.map(edit, range(batch))
                        elapsed += time.perf_counter() - started
                        done += batch
                        rss = _settled_rss(proc.pid)
                        print(f"{done:5d} edits: RSS {rss / 2**20:.1f} MiB", flush=True)
                end = rss
        finally:
            proc.terminate()
            proc.wait(60)
    growth = (end - warm) / warm * 100
    seconds.sort()
    print(f"edits: {args.edits} ({args.warmup} warm-up), {args.size} px, {args.clients} clients,"
          f" {len(seconds) / elapsed:.1f} edits/s, p50 {seconds[len(seconds) // 2] * 1000:.0f} ms")
    print(f"RSS after warm-up: {warm / 2**20:.1f} MiB")
    print(f"RSS at the end:    {end / 2**20:.1f} MiB")
    print(f"growth: {growth:+.1f}% (goal: <= 5%) {'ok' if growth <= 5 else 'OVER'}")


if __name__ == "__main__":
    sys.exit(main())
