"""Run a real openedits server process on a FakeEngine, for crash and restart tests.

Usage: python -m tests._serve PORT STEP_SECONDS  (Settings come from OPENEDITS_* variables)
"""

from __future__ import annotations

import sys

from openedits.api._drain import run_server
from openedits.api.app import create_app
from openedits.settings import Settings
from tests.fakes import FakeEngine


def main() -> None:
    port, step_seconds = int(sys.argv[1]), float(sys.argv[2])
    app = create_app(Settings(), engine=FakeEngine(steps=4, step_seconds=step_seconds))
    # As `openedits serve` runs it: SIGTERM drains before the process exits.
    run_server(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
