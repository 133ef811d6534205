"""Run a real `openedits worker` (Celery, prefork) on a FakeEngine, for multi-process tests.

Usage: python -m tests._worker STEP_SECONDS [DEVICES [DRAIN_SECONDS]]  (Settings from OPENEDITS_*)
"""

from __future__ import annotations

import sys

from openedits._logging import configure_logging
from openedits.settings import Settings
from openedits.workers.celery_app import WorkerOptions, run_worker
from tests.fakes import FakeEngine


def main() -> None:
    step_seconds = float(sys.argv[1])
    settings = Settings()
    configure_logging(settings.log_level)
    devices = sys.argv[2].split(",") if len(sys.argv) > 2 else settings.devices
    options = WorkerOptions(
        devices=devices,
        loglevel="WARNING",
        drain_seconds=float(sys.argv[3]) if len(sys.argv) > 3 else 30.0,
        engine_factory=lambda _settings: FakeEngine(steps=4, step_seconds=step_seconds),
    )
    run_worker(settings, options)


if __name__ == "__main__":
    main()
