"""Scale-out throughput and cross-node progress latency, on real processes and services.

Runs an API node (`openedits serve` with a broker) and Celery worker processes whose engine holds
its device for a fixed time (a sleep: the device is busy, the CPU is not), with Redis, PostgreSQL
and SeaweedFS (started here by scripts/services.py unless OPENEDITS_TEST_* variables name running
ones). Prints, for 1, 2 and 4 workers, tasks per second and its ratio to the ideal
(workers ÷ hold time; goal ≥ 0.9 each), then the latency from a worker's progress step to the
line that carries it on an NDJSON stream at the API node (goal: median < 100 ms).

    .venv/bin/python bench/scale.py [--hold 1.0] [--tasks-per-worker 12] [--workers 1,2,4]

Needs the scale extra and the three servers' programs (what ./scripts/test installs); imports
nothing from tests/.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _support import free_port, wait_ready
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
STEPS = 10  # progress steps per task in the latency run


class HoldEngine:
    """Holds its device for `hold` seconds per edit, in `steps` steps, and notes (in a file)
    when it reported each step, so the bench can time their arrival elsewhere."""

    name = "hold"

    def __init__(self, hold: float, steps: int, notes: Path | None) -> None:
        from openedits.engines.base import Capabilities

        self.capabilities = Capabilities(needs_mask=False, honours_prompt=True)
        self.hold, self.steps, self.notes = hold, steps, notes

    def load(self, device: str = "auto") -> None:
        pass

    def info(self) -> Any:
        from openedits.engines.base import EngineInfo

        return EngineInfo(name=self.name, loaded=True)

    def validate(self, image: Image.Image, mask: Image.Image | None, prompt: str) -> None:
        pass

    def edit(self, image: Image.Image, mask: Image.Image | None, prompt: str, *, n: int,
             seed: int, preset: str, on_progress: Any, should_cancel: Any) -> list[Image.Image]:
        marks = []
        for step in range(self.steps):
            time.sleep(self.hold / self.steps)
            marks.append((prompt, step + 1, time.time()))
            on_progress((step + 1) / self.steps)
        if self.notes is not None:
            with self.notes.open("a") as f:
                f.writelines(json.dumps(m) + "\n" for m in marks)
        return [image.convert("RGB")] * n


def _image_uri(colour: tuple[int, int, int] = (90, 120, 200)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


MASK = _image_uri((255, 255, 255))


def _services(tmp: Path) -> tuple[dict[str, str], Any]:
    """Running services from the environment, or ones started here (and a stop function)."""
    if os.environ.get("OPENEDITS_TEST_REDIS_URL") and os.environ.get("OPENEDITS_TEST_S3_ENDPOINT"):
        return dict(os.environ), lambda: None
    sys.path.insert(0, str(ROOT / "scripts"))
    import services

    root = tmp / "services"
    root.mkdir()
    os.chmod(tmp, 0o755)
    env = services.start(root)
    return env, lambda: services.stop(root)


def _fleet_env(svc: dict[str, str], tmp: Path, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENEDITS_")}
    env.update({
        "OPENEDITS_BROKER_URL": svc["OPENEDITS_TEST_REDIS_URL"],
        "OPENEDITS_DATABASE_URL": database_url,
        "OPENEDITS_BLOBS_URL": f"s3://{svc['OPENEDITS_TEST_S3_BUCKET']}/bench-{secrets.token_hex(4)}",
        "OPENEDITS_DATA_DIR": str(tmp / "data"),
        "OPENEDITS_API_TOKENS": TOKEN,
        "OPENEDITS_ALLOW_PRIVATE_URLS": "true",
        "OPENEDITS_RATE_LIMIT": "off",
        "OPENEDITS_ENGINE": "opencv",
        "OPENEDITS_LOG_LEVEL": "WARNING",
        "AWS_ENDPOINT_URL": svc["OPENEDITS_TEST_S3_ENDPOINT"],
        "AWS_ACCESS_KEY_ID": svc["OPENEDITS_TEST_S3_KEY"],
        "AWS_SECRET_ACCESS_KEY": svc["OPENEDITS_TEST_S3_SECRET"],
        "AWS_REGION": "us-east-1",
        "PYTHONPATH": str(ROOT / "src"),
    })
    return env


def _fresh_database(admin_url: str) -> str:
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    name = "bench_" + secrets.token_hex(4)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=out,
                            start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _submit(url: str, uri: str, count: int, prompt: str) -> list[str]:
    body = {"image_url": uri, "mask": MASK, "prompt": prompt, "async": True}
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        return [client.post("/midjourney/edits", json=body).json()["task_id"]
                for _ in range(count)]


def _wait_ended(database_url: str, ids: list[str], timeout: float) -> list[tuple[float, float]]:
    """(started_at, finished_at) of each task once all succeeded."""
    from sqlalchemy import bindparam, create_engine, text

    engine = create_engine(database_url)
    query = text("SELECT state, started_at, finished_at FROM tasks WHERE id IN :ids").bindparams(
        bindparam("ids", expanding=True))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                rows = conn.execute(query, {"ids": ids}).all()
            if len(rows) == len(ids) and all(r[0] in {"succeeded", "failed", "cancelled"}
                                             for r in rows):
                bad = [r[0] for r in rows if r[0] != "succeeded"]
                if bad:
                    raise SystemExit(f"tasks ended {bad}")
                return [(float(r[1]), float(r[2])) for r in rows]
            time.sleep(0.1)
    finally:
        engine.dispose()
    raise SystemExit("tasks did not end in time")


def _throughput(env: dict[str, str], url: str, database_url: str, workers: int, hold: float,
                per_worker: int, tmp: Path, uri: str) -> tuple[float, float, float]:
    """Tasks per second, and the mean seconds per task lost inside the task (beyond the hold)
    and between tasks (a worker idle while a queue waits)."""
    proc = _start([sys.executable, __file__, "--worker", str(workers), "--hold", str(hold)],
                  env, tmp / f"worker-{workers}.log")
    try:
        # Warm up every pool process (its Runtime is built after the fork), then measure.
        _wait_ended(database_url, _submit(url, uri, workers, "warm"), 120)
        ids = _submit(url, uri, workers * per_worker, "measure")
        spans = _wait_ended(database_url, ids, 60 + 4 * per_worker * hold)
    finally:
        _stop(proc)
    makespan = max(f for _, f in spans) - min(s for s, _ in spans)
    busy = sum(f - s for s, f in spans)
    inside = busy / len(spans) - hold
    between = max(0.0, makespan * workers - busy) / len(spans)
    return len(ids) / makespan, inside, between


def _latency(env: dict[str, str], url: str, database_url: str, tmp: Path, uri: str,
             tasks: int) -> list[float]:
    notes = tmp / "steps.jsonl"
    proc = _start([sys.executable, __file__, "--worker", "1", "--hold", "1.0", "--steps",
                   str(STEPS), "--notes", str(notes)], env, tmp / "worker-latency.log")
    latencies: list[float] = []
    try:
        _wait_ended(database_url, _submit(url, uri, 1, "warm"), 120)
        for i in range(tasks):
            prompt = f"latency {i}"
            arrivals: dict[int, float] = {}
            body = {"image_url": uri, "mask": MASK, "prompt": prompt}
            with httpx.stream("POST", url + "/midjourney/edits", json=body, timeout=60,
                              headers={**AUTH, "accept": "application/x-ndjson"}) as r:
                for line in r.iter_lines():
                    if line.strip():
                        arrivals.setdefault(int(json.loads(line)["progress"]), time.time())
            time.sleep(0.2)  # the worker appends its notes after the edit
            for raw in notes.read_text().splitlines():
                noted_prompt, step, at = json.loads(raw)
                # The runner maps engine fractions into progress 5..95.
                progress = 5 + int(step / STEPS * 90)
                if noted_prompt == prompt and progress in arrivals and progress < 100:
                    latencies.append(arrivals[progress] - at)
    finally:
        _stop(proc)
    return latencies


def _run_worker(args: argparse.Namespace) -> None:
    from openedits._logging import configure_logging
    from openedits.settings import Settings
    from openedits.workers.celery_app import WorkerOptions, run_worker

    settings = Settings()
    configure_logging(settings.log_level)
    notes = Path(args.notes) if args.notes else None
    options = WorkerOptions(
        devices=["cpu"] * args.worker, loglevel="WARNING",
        engine_factory=lambda _s: HoldEngine(args.hold, args.steps, notes),  # type: ignore[arg-type,return-value]
    )
    run_worker(settings, options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hold", type=float, default=1.0, help="seconds an edit holds a device")
    parser.add_argument("--tasks-per-worker", type=int, default=12)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--latency-tasks", type=int, default=5)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--notes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _run_worker(args)
        return

    with tempfile.TemporaryDirectory(prefix="openedits-bench-") as name:
        tmp = Path(name)
        svc, stop_services = _services(tmp)
        api: subprocess.Popen[bytes] | None = None
        try:
            database_url = _fresh_database(svc["OPENEDITS_TEST_POSTGRES_URL"])
            env = _fleet_env(svc, tmp, database_url)
            port = free_port()
            api = _start([sys.executable, "-c", "from openedits.cli import main; main()",
                          "serve", "--port", str(port)], env, tmp / "api.log")
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, api, path="/healthz", log=tmp / "api.log")
            uri = _image_uri()
            print(f"engine holds its device {args.hold:.2f} s per task; "
                  f"{args.tasks_per_worker} tasks per worker")
            worst = 1.0
            for workers in [int(w) for w in args.workers.split(",")]:
                rate, inside, between = _throughput(env, url, database_url, workers, args.hold,
                                                    args.tasks_per_worker, tmp, uri)
                ideal = workers / args.hold
                worst = min(worst, rate / ideal)
                print(f"{workers} worker(s): {rate:6.2f} tasks/s, ideal {ideal:5.2f}, "
                      f"ratio {rate / ideal:.3f} (goal >= 0.9); per task "
                      f"{inside * 1000:.0f} ms inside the task beyond the hold, "
                      f"{between * 1000:.0f} ms between tasks")
            latencies = _latency(env, url, database_url, tmp, uri, args.latency_tasks)
            if latencies:
                ms = sorted(x * 1000 for x in latencies)
                print(f"progress worker -> stream on the API node: median "
                      f"{statistics.median(ms):.1f} ms, p90 {ms[int(len(ms) * 0.9)]:.1f} ms, "
                      f"over {len(ms)} steps (goal: median < 100 ms)")
            print(f"worst throughput ratio {worst:.3f}")
        finally:
            if api is not None:
                _stop(api)
            stop_services()


if __name__ == "__main__":
    main()
