"""End-to-end sync latency of a 512 px edit against the engine's own compute for it.

Runs a real openedits server (uvicorn on loopback, the opencv engine, SQLite in a temp dir),
sends N synchronous edits over HTTP, and, in the same run, times `engine.edit()` alone on the
same image and mask. Prints both and their ratio (goal: <= 1.15).

    .venv/bin/python bench/edit_latency.py [--n 10] [--size 512] [--engine opencv|diffusers]

`--engine diffusers` uses the tiny random-weight model the tests build (2 steps; `--model` for a
real checkpoint): the server's fixed costs against an engine that takes seconds, not milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import data_uri
from tests.engines.contract import make_test_image, make_test_mask
from tests.servers import serve_in_thread

from openedits.api.app import create_app
from openedits.engines.base import Engine
from openedits.engines.opencv import OpenCVEngine
from openedits.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--engine", choices=["opencv", "diffusers"], default="opencv")
    parser.add_argument("--model", help="diffusers: a model folder (default: the tiny one)")
    args = parser.parse_args()

    size = (args.size, args.size)
    image, mask = make_test_image(size), make_test_mask(size)
    with tempfile.TemporaryDirectory() as models:
        engine = _engine(args, Path(models))
        engine.load("auto")
        _run(args, engine, image, mask)


def _engine(args: argparse.Namespace, models: Path) -> Engine:
    if args.engine == "opencv":
        return OpenCVEngine()
    from openedits.engines.diffusers import DiffusersEngine

    model = args.model
    if model is None:
        from tests.engines.tiny_diffusers import build_tiny_pipeline

        model = build_tiny_pipeline(models / "tiny", "sd")
    return DiffusersEngine(model, "auto", steps=None if args.model else 2, work_size="input")


def _run(args: argparse.Namespace, engine: Engine, image: Image.Image, mask: Image.Image) -> None:

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), api_tokens="bench", log_level="WARNING",
                            rate_limit="off")
        app = create_app(settings, engine=engine)
        body = {"image_url": data_uri(image), "mask": data_uri(mask), "prompt": "bench",
                "split_images": True}
        headers = {"authorization": "Bearer bench"}
        end_to_end: list[float] = []
        compute: list[float] = []
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as client:
            client.post("/midjourney/edits", json=body, headers=headers).raise_for_status()
            for _ in range(args.n):
                # Interleave the two measurements so drift on the machine hits both alike.
                t0 = time.perf_counter()
                engine.edit(image, mask, "bench", n=4, seed=0, preset="fast")
                compute.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                r = client.post("/midjourney/edits", json=body, headers=headers)
                end_to_end.append(time.perf_counter() - t0)
                r.raise_for_status()

    e2e, eng = statistics.median(end_to_end), statistics.median(compute)
    print(f"engine {engine.name}, image {args.size}x{args.size}, 4 variants, n={args.n} (medians)")
    print(f"  engine compute alone : {eng * 1000:8.1f} ms")
    print(f"  end-to-end sync HTTP : {e2e * 1000:8.1f} ms")
    print(f"  overhead             : {(e2e - eng) * 1000:8.1f} ms")
    print(f"  ratio e2e / compute  : {e2e / eng:8.3f}   (goal <= 1.15)")


if __name__ == "__main__":
    main()
