"""Hanging receivers vs a healthy one: how late the healthy callback arrives behind them.

Eight loopback receivers accept the connection and never answer (each owed `--backlog`
callbacks, all due first); one healthy receiver answers at once. The delivery loop runs
as in the server (its own threads, the SQLite outbox), once as the old single pool of 4 senders
with no per-destination limit, and once as configured now (32 senders, at most 2 per
destination). It prints, for each, the time from the loop's start to the healthy callback's
arrival, and the ratio. Goal: the healthy one arrives within a small fraction of the webhook
timeout (the old pool made it wait out a whole timeout).

    .venv/bin/python bench/callback_isolation.py [--timeout 5] [--hanging 8] [--backlog 1]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes import FakeClock, hanging_listener, serve_receiver  # noqa: E402

from openedits.settings import Settings  # noqa: E402
from openedits.store.database import create_db_engine, migrate  # noqa: E402
from openedits.webhooks import DeliveryLoop, Outbox, owe_callback  # noqa: E402
from openedits.webhooks.delivery import PER_HOST, SENDERS  # noqa: E402

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def healthy_latency(senders: int, per_host: int, *, hanging: int, backlog: int,
                    timeout: float) -> float:
    """Seconds from the loop's start to the healthy receiver having the callback."""
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        db = create_db_engine(f"sqlite:///{Path(tmp) / 'db.sqlite'}")
        migrate(db)
        clock = FakeClock()
        settings = Settings(allow_private_urls=True, webhook_timeout_seconds=timeout)
        loop = DeliveryLoop(Outbox(db, clock=clock), secret=lambda: SECRET, settings=settings,
                            clock=clock, rng=random.Random(1), senders=senders,
                            per_host=per_host)
        urls = [stack.enter_context(hanging_listener()) for _ in range(hanging)]
        healthy = stack.enter_context(serve_receiver())
        with db.begin() as conn:
            for i, url in enumerate(urls):
                for j in range(backlog):
                    owe_callback(conn, task_id=f"h{i}-{j}", url=f"{url}/hook?n={j}",
                                 body={"n": j}, now=clock() - 10 + i)
            owe_callback(conn, task_id="healthy", url=healthy.url + "/hook", body={},
                         now=clock())
        started = time.monotonic()
        loop.start()
        try:
            if not healthy.wait_for(1, timeout=timeout * (hanging * backlog + 2)):
                raise RuntimeError("the healthy callback never arrived")
            return time.monotonic() - started
        finally:
            stack.close()
            loop.stop()
            db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=5.0, help="webhook timeout, seconds")
    parser.add_argument("--hanging", type=int, default=8)
    parser.add_argument("--backlog", type=int, default=1, help="callbacks owed to each")
    args = parser.parse_args()
    before, now = (
        healthy_latency(senders, per_host, hanging=args.hanging, backlog=args.backlog,
                        timeout=args.timeout)
        for senders, per_host in ((4, 4), (SENDERS, PER_HOST))
    )
    print(f"{args.hanging} hanging receivers owed {args.backlog} callbacks each, "
          f"webhook timeout {args.timeout:g} s")
    print(f"  one pool of 4, no per-destination limit: healthy callback after {before:.3f} s")
    print(f"  {SENDERS} senders, {PER_HOST} per destination:      "
          f"healthy callback after {now:.3f} s")
    print(f"  ratio before/now: {before / now:.0f}x; now / timeout: {now / args.timeout:.4f}")


if __name__ == "__main__":
    main()
