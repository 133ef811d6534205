"""Benchmark the diffusers engine: batching, warm weights, and seconds per denoising step.

Prints, measured side by side in one run:

- 4 variants in one batched call ÷ 4 sequential single-variant calls (goal ≤ 0.6),
- the first request (weights loaded, then the edit) ÷ a warm request,
- seconds per denoising step at each size (64/128/512 px by default).

With no `--model` it builds the tiny random-weight test pipeline into a temporary folder, so it
runs offline on a CPU; give `--model` (a diffusers folder or hub id) and `--device cuda` to measure
a real checkpoint on a GPU, unchanged:

    .venv/bin/python bench/diffusion.py
    .venv/bin/python bench/diffusion.py --model stable-diffusion-v1-5/stable-diffusion-inpainting \\
        --device cuda --sizes 512,768,1024
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # for tests.engines.tiny_diffusers

from tests.engines.contract import make_test_image, make_test_mask  # noqa: E402

from openedits.engines.diffusers import DiffusersEngine  # noqa: E402
from openedits.errors import TaskCancelled  # noqa: E402

PROMPT = "a red apple on a wooden table"
GOAL_BATCH_RATIO = 0.6


def timed(
    engine: DiffusersEngine, size: int, n: int, seed: int, preset: str
) -> tuple[float, float]:
    """Wall and process-CPU seconds of one edit of a size×size image with a mask, n variants."""
    image, mask = make_test_image((size, size)), make_test_mask((size, size))
    wall, cpu = time.perf_counter(), time.process_time()
    engine.edit(image, mask, PROMPT, n=n, seed=seed, preset=preset)  # type: ignore[arg-type]
    return time.perf_counter() - wall, time.process_time() - cpu


def seconds_per_step(engine: DiffusersEngine, size: int, n: int, preset: str) -> float | None:
    """Shortest time between step callbacks; the run is cancelled after 3 steps to skip the rest."""
    image, mask = make_test_image((size, size)), make_test_mask((size, size))
    stamps: list[float] = []
    with contextlib.suppress(TaskCancelled):  # the cancel after 3 steps is the plan
        engine.edit(
            image,
            mask,
            PROMPT,
            n=n,
            seed=0,
            preset=preset,  # type: ignore[arg-type]
            on_progress=lambda _f: stamps.append(time.perf_counter()),
            should_cancel=lambda: len(stamps) >= 3,
        )
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return min(gaps) if gaps else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers folder or hub id (default: tiny test model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--preset", default="fast", choices=["turbo", "fast", "relax"])
    parser.add_argument("--steps", type=int, help="override the preset's steps (tiny default: 2)")
    parser.add_argument("--size", type=int, default=512, help="input side for batch/warm runs")
    parser.add_argument("--sizes", default="64,128,512", help="sides for seconds per step")
    parser.add_argument("--step-n", type=int, default=1, help="variants per step measurement")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (best of)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    # Harmless numpy-2 deprecation inside diffusers' DPM-Solver; keep the output readable.
    warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)

    t0 = time.perf_counter()
    import diffusers  # noqa: F401  (import cost is the process's, not a request's)
    import torch

    imports = time.perf_counter() - t0
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        steps = args.steps
        if model is None:
            from tests.engines.tiny_diffusers import build_tiny_pipeline

            model = str(build_tiny_pipeline(Path(tmp) / "tiny", "sd"))
            steps = steps or 2
        # "native": the batch and warm figures run where the server runs (the model's own size).
        # As the server builds it (from_settings): warm-up at load included.
        engine = DiffusersEngine(model, args.device, steps=steps, work_size="native", warmup=True)
        start = time.perf_counter()
        engine.load()
        load = time.perf_counter() - start
        first_edit = timed(engine, args.size, 4, 0, args.preset)[0]
        first = load + first_edit
        info = engine.info()
        work = engine.work_size_for((args.size, args.size))
        steps_run = engine.presets[args.preset].steps
        print(f"model    {info.model}")
        print(
            f"device   {info.device} {info.extra}  torch {torch.__version__} "
            f"threads {torch.get_num_threads()}"
        )
        print(f"preset   {args.preset}, {steps_run} steps; input {args.size}px → work {work}")
        print(f"imports  {imports:.2f} s (once per process)")

        # Batched and sequential runs alternate, and each figure is the best of the repeats (as
        # timeit does): on shared cores other load only ever adds time, so the minimum is the
        # least disturbed measurement.
        warm, batched, sequential, batched_cpu, sequential_cpu = [], [], [], [], []
        for r in range(args.repeats):
            warm.append(timed(engine, args.size, 4, r, args.preset)[0])
            b_wall, b_cpu = timed(engine, args.size, 4, r, args.preset)
            singles = [timed(engine, args.size, 1, r + i, args.preset) for i in range(4)]
            batched.append(b_wall)
            batched_cpu.append(b_cpu)
            sequential.append(sum(w for w, _ in singles))
            sequential_cpu.append(sum(c for _, c in singles))
        warm_s = min(warm)
        ratio = min(batched) / min(sequential)
        verdict = "ok" if ratio <= GOAL_BATCH_RATIO else f"above the {GOAL_BATCH_RATIO} goal"
        print()
        print(f"batched 4 variants      {min(batched):8.3f} s  (best of {args.repeats})")
        print(f"4 sequential singles    {min(sequential):8.3f} s")
        print(f"batched ÷ sequential    {ratio:8.2f}    {verdict}")
        print(f"  same, in CPU time     {min(batched_cpu) / min(sequential_cpu):8.2f}")
        print()
        parts = f"load with warm-up {load:.3f} + edit {first_edit:.3f}"
        print(f"first request           {first:8.3f} s  ({parts})")
        print(f"warm request            {warm_s:8.3f} s")
        print(f"first ÷ warm            {first / warm_s:8.2f}")
        print()
        engine.work_size = "input"  # per-step figures at the sizes asked, not the model's own
        for side in (int(x) for x in args.sizes.split(",")):
            per_step = seconds_per_step(engine, side, args.step_n, args.preset)
            shown = "n/a (needs ≥ 2 steps)" if per_step is None else f"{per_step:8.3f} s"
            print(f"s/step at {side:4d} px (n={args.step_n})  {shown}", flush=True)


if __name__ == "__main__":
    main()
