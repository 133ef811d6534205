"""End-to-end sync latency of a 512 px edit against the engine's own compute for it.

Runs a real openedits server (uvicorn on loopback, the opencv engine, SQLite in a temp dir),
sends N synchronous edits over HTTP, and, in the same run, times `engine.edit()` alone on the
same image and mask. Prints both and their ratio (goal: <= 1.15), and, also interleaved, the
floor: what no server can skip for a lossless result (the inputs decoded from their PNG bytes,
the engine, the paste-back outside the mask, the five PNGs encoded on the server's encoder
pool), with no HTTP, store or file write; its ratio is the best any server could reach on this
machine with this engine. Then the result encoders side
by side on the same four variants: Pillow's PNG (what openedits used), OpenCV's, and openedits'
own (the grid spliced from the variants' rows), all lossless and checked to decode to the same
pixels, and webp/jpeg for `output_format`.

    .venv/bin/python bench/edit_latency.py [--n 10] [--size 512] [--engine opencv|diffusers]

`--engine diffusers --model DIR` uses a local diffusers checkpoint: the server's fixed costs
against an engine that takes seconds, not milliseconds.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

import httpx
import numpy as np
from _support import data_uri, make_image, make_mask, make_photo, png_bytes, serve_in_thread
from PIL import Image

from openedits.api.app import create_app
from openedits.engines.base import Engine
from openedits.engines.opencv import OpenCVEngine
from openedits.imaging.decode import decode_image
from openedits.imaging.encode import encode_results
from openedits.imaging.grid import make_grid
from openedits.imaging.mask import decode_mask, kept_outside
from openedits.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--engine", choices=["opencv", "diffusers"], default="opencv")
    parser.add_argument("--model", help="diffusers: a local model folder")
    args = parser.parse_args()

    size = (args.size, args.size)
    image, mask = make_image(size), make_mask(size)
    engine = _engine(args)
    engine.load("auto")
    _run(args, engine, image, mask)
    variants = engine.edit(image, mask, "bench", n=4, seed=0, preset="fast")
    _encoders("the edit's variants", variants)
    photo = make_photo(size)
    _encoders("photo-like variants", [photo.rotate(90 * i) for i in range(4)])


def _engine(args: argparse.Namespace) -> Engine:
    if args.engine == "opencv":
        return OpenCVEngine()
    if not args.model:
        raise SystemExit("--engine diffusers needs --model DIR (a local diffusers checkpoint)")
    from openedits.engines.diffusers import DiffusersEngine

    return DiffusersEngine(args.model, "auto", work_size="input")


def _run(args: argparse.Namespace, engine: Engine, image: Image.Image, mask: Image.Image) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), api_tokens="bench", log_level="WARNING",
                            rate_limit="off")
        app = create_app(settings, engine=engine)
        body = {"image_url": data_uri(image), "mask": data_uri(mask), "prompt": "bench",
                "split_images": True}
        headers = {"authorization": "Bearer bench"}
        image_png, mask_png = png_bytes(image), png_bytes(mask)
        end_to_end: list[float] = []
        compute: list[float] = []
        floor: list[float] = []
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
                floor.append(_floor(app.state.runtime.encoder, engine, image_png, mask_png))
            # The last task's own account of where its time went.
            task = client.post("/midjourney/tasks", headers=headers,
                               json={"id": r.json()["task_id"]}).json()
            timings = app.state.runtime.store.get(task["id"]).timings or {}

    e2e, eng, least = (statistics.median(x) for x in (end_to_end, compute, floor))
    print(f"engine {engine.name}, image {args.size}x{args.size}, 4 variants, n={args.n} (medians)")
    print(f"  engine compute alone : {eng * 1000:8.1f} ms")
    print(f"  end-to-end sync HTTP : {e2e * 1000:8.1f} ms")
    print(f"  overhead             : {(e2e - eng) * 1000:8.1f} ms")
    print(f"  ratio e2e / compute  : {e2e / eng:8.3f}   (goal <= 1.15)")
    print(f"  floor (no HTTP/store): {least * 1000:8.1f} ms   ratio {least / eng:.3f}: decode, "
          "engine, paste-back, 5 lossless PNGs")
    print("  last task's timings  : " + ", ".join(
        f"{k} {v * 1000:.1f} ms" for k, v in timings.items()))


def _floor(pool: Executor, engine: Engine, image_png: bytes, mask_png: bytes) -> float:
    """Seconds for what any server must do for one lossless edit, without HTTP or a store."""
    t0 = time.perf_counter()
    image = decode_image(image_png, max_pixels=1 << 26, max_side=4096).image
    mask = decode_mask(mask_png, image.size, max_pixels=1 << 26)
    variants = engine.edit(image, mask, "bench", n=4, seed=0, preset="fast")
    kept = kept_outside(np.asarray(image), variants, mask, mapper=pool.map)
    encode_results(kept, pool=pool)
    return time.perf_counter() - t0


def _pillow_png(images: list[Image.Image]) -> list[bytes]:
    out = []
    for im in [*images, make_grid(images)]:
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


def _opencv_png(images: list[Image.Image]) -> list[bytes]:
    import cv2

    arrays = [np.asarray(im)[:, :, ::-1] for im in [*images, make_grid(images)]]
    return [cv2.imencode(".png", a, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()
            for a in arrays]


def _ours(fmt: str) -> Callable[[list[Image.Image]], list[bytes]]:
    def encode(images: list[Image.Image]) -> list[bytes]:
        files = encode_results(images, fmt=fmt)  # type: ignore[arg-type]
        return [d for _, d, _ in files.singles] + [files.grid[1]]

    return encode


def _encoders(label: str, variants: list[Image.Image]) -> None:
    """The five result files (four variants and the grid), one thread, best of 5."""
    expected = [np.asarray(v) for v in variants] + [np.asarray(make_grid(variants))]
    print(f"encoding the 5 result files of {label} ({variants[0].width} px), one thread:")
    rows = [("Pillow PNG level 1 (before)", _pillow_png, True),
            ("OpenCV PNG level 1", _opencv_png, True),
            ("openedits PNG", _ours("png"), True),
            ("openedits webp (q 90)", _ours("webp"), False),
            ("openedits jpeg (q 90)", _ours("jpeg"), False)]
    baseline = None
    for name, encode, lossless in rows:
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            files = encode(variants)
            best = min(best, time.perf_counter() - t0)
        if lossless:
            for data, want in zip(files, expected, strict=True):
                with Image.open(io.BytesIO(data)) as im:
                    assert np.array_equal(np.asarray(im.convert("RGB")), want), name
        baseline = baseline or best
        size = sum(len(f) for f in files)
        print(f"  {name:30s} {best * 1000:7.1f} ms  {baseline / best:5.2f}x  {size / 1e3:8.1f} KB"
              + ("  lossless, same pixels" if lossless else ""))


if __name__ == "__main__":
    main()
