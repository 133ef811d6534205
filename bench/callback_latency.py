"""Task end → callback received: how long a finished task's callback takes to reach a receiver.

Runs the real app (in-process workers, the SQLite store, the delivery loop) on a FakeEngine that
finishes at once, submits tasks with a callback_url pointing at a loopback receiver, and measures
from the task's `finished_at` (written in the same transaction as its outbox row) to the moment
the receiver has read the signed POST. Goal: p50 ≤ 20 ms, which needs the loop to be woken by the
finish event rather than find the row on its next poll.

    .venv/bin/python bench/callback_latency.py [--tasks 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _support import FixedTimeEngine, data_uri, make_image, serve_receiver
from fastapi.testclient import TestClient

from openedits.api.app import create_app
from openedits.runtime import Runtime
from openedits.settings import Settings

GOAL_P50_MS = 20.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args()

    arrivals: dict[str, float] = {}
    arrived = threading.Condition()

    def on_request(body: Any) -> None:
        now = time.time()
        with arrived:
            arrivals[body["task_id"]] = now
            arrived.notify_all()

    image = data_uri(make_image((64, 48)))
    with tempfile.TemporaryDirectory() as tmp, serve_receiver(on_request) as receiver_url:
        settings = Settings(
            data_dir=Path(tmp) / "data",
            api_tokens="bench",
            allow_private_urls=True,
            rate_limit="off",  # a benchmark submits faster than any client should
            # The poll is set long on purpose: only the finish event can make the goal.
            webhook_poll_seconds=5.0,
        )
        headers = {"authorization": "Bearer bench"}
        with TestClient(create_app(settings, engine=FixedTimeEngine(0.0, steps=1))) as client:
            rt: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
            latencies: list[float] = []
            for _ in range(args.tasks):
                r = client.post("/midjourney/edits", headers=headers, json={
                    "image_url": image, "prompt": "x", "callback_url": receiver_url + "/hook"})
                task_id = r.json()["task_id"]
                with arrived:
                    if not arrived.wait_for(lambda: task_id in arrivals, 10):  # noqa: B023
                        raise SystemExit(f"callback for {task_id} never arrived")
                row = rt.store.get(task_id)
                assert row is not None and row.finished_at is not None
                latencies.append((arrivals[task_id] - row.finished_at) * 1000)

    p50, p99 = _percentile(latencies, 0.50), _percentile(latencies, 0.99)
    print(f"callback latency, task end → received, {len(latencies)} tasks (SQLite, loopback)")
    print(f"  p50  {p50:7.2f} ms   (goal ≤ {GOAL_P50_MS:.0f} ms: {p50 / GOAL_P50_MS:.2f}x of goal)")
    print(f"  p99  {p99:7.2f} ms")
    print(f"  mean {statistics.fmean(latencies):7.2f} ms   max {max(latencies):7.2f} ms")


if __name__ == "__main__":
    main()
