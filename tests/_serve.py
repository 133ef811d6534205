"""Run a real openedits server process on a FakeEngine, for crash, restart and load tests.

Usage: python -m tests._serve PORT STEP_SECONDS  (Settings come from OPENEDITS_* variables)
"""

from __future__ import annotations

import sys

from openedits.api.app import create_app
from openedits.api.server import run_server
from openedits.settings import Settings
from tests.fakes import FakeEngine


def main() -> None:
    port, step_seconds = int(sys.argv[1]), float(sys.argv[2])
    settings = Settings(log_level="WARNING")
    app = create_app(settings, engine=FakeEngine(steps=4, step_seconds=step_seconds))
    # What `openedits serve` runs: the same protocol, limits and deadlines.
    run_server(app, settings, host="127.0.0.1", port=port)


if __name__ == "__main__":
    main()
