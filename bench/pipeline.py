"""The device's idle time: how busy one device is over a queue of tasks, staged against not.

Queues N tasks (a 512 px image and mask inline, four 512 px variants out) for an engine that
holds its device a fixed time per edit, on the default settings, and runs them through the
in-process dispatcher twice in one run: staged (inputs prepared ahead, results written behind)
and sequential (each task start to end on the device's worker, as before the stages). Prints
device busy fraction = engine time / wall time for both (goal: staged >= 0.95).

    .venv/bin/python bench/pipeline.py [--n 50] [--seconds 0.2] [--size 512]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _support import FixedTimeEngine, data_uri, make_mask, make_photo

from openedits.runtime import Runtime
from openedits.schemas import TaskState
from openedits.settings import Settings
from openedits.store.tasks import NewTask
from openedits.workers.dispatch import InProcessDispatcher


def _run(args: argparse.Namespace, staged: bool) -> tuple[float, float, int, dict[str, float]]:
    size = (args.size, args.size)
    body = {"image_url": data_uri(make_photo(size)), "mask": data_uri(make_mask(size)),
            "prompt": "bench", "split_images": True}
    engine = FixedTimeEngine(args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), log_level="WARNING")
        rt = Runtime.build(settings, engine=engine)
        try:
            ids = []
            for i in range(args.n):
                task_id = f"{i:08d}-0000-4000-8000-000000000000"
                rt.store.create(NewTask(id=task_id, owner="bench", trace_id=task_id,
                                        request={}, priority=1, base_url="http://bench/"), body)
                ids.append(task_id)
            dispatcher = InProcessDispatcher(rt, staged=staged)
            t0 = time.time()
            dispatcher.start()
            dispatcher.submit(ids[0], 1)
            # One small query a tenth of a second: the watcher must not load the process it
            # measures (reading all 50 rows every 50 ms did, by about 1% of device time).
            while rt.store.live(ids):
                time.sleep(0.1)
            dispatcher.stop()
            rows = [rt.store.get(t) for t in ids]
            wall = max(r.finished_at for r in rows if r and r.finished_at) - t0
            ok = sum(1 for r in rows if r and r.state is TaskState.succeeded)
            timed = [r.timings for r in rows if r and r.timings]
            phases = {k: sum(t[k] for t in timed) / max(1, len(timed))
                      for k in ("inputs", "engine", "results")}
        finally:
            rt.close()
    return engine.busy, wall, ok, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=0.2, help="device time per edit")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    print(f"{args.n} tasks, {args.size} px, engine holds its device {args.seconds:.2f} s an "
          "edit, default settings")
    for label, staged in (("staged    ", True), ("sequential", False)):
        busy, wall, ok, phases = _run(args, staged)
        print(f"  {label}: wall {wall:6.2f} s, engine {busy:6.2f} s, {ok}/{args.n} succeeded, "
              f"device busy {busy / wall:6.3f}" + ("   (goal >= 0.95)" if staged else ""))
        print("              per task: " + ", ".join(
            f"{k} {v * 1000:.0f} ms" for k, v in phases.items()))


if __name__ == "__main__":
    main()
