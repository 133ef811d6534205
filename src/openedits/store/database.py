"""The database connection: engine creation (SQLite in WAL mode, or any URL) and migrations."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

__all__ = ["create_db_engine", "migrate"]

log = logging.getLogger(__name__)
_MIGRATIONS = Path(__file__).parent / "migrations"
# The advisory lock every openedits process takes around its migration on PostgreSQL: a deploy
# starts API nodes and workers together, and two concurrent upgrades would both try to create
# the same tables. (An arbitrary constant: "oe" "migrate" in hex, fits a bigint.)
MIGRATION_LOCK = 0x6F65_6D69_6772_6174


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers (retrieve, sync waiters) run while a worker writes; busy_timeout turns
    # short write contention between threads into a wait instead of "database is locked".
    cursor = dbapi_connection.cursor()
    # 16 KiB pages (set only when the file is created; a no-op on an existing one): a submit
    # with an inline photo writes ~40 pages instead of ~150, and each page costs system calls
    # in the WAL write and again in the checkpoint.
    cursor.execute("PRAGMA page_size=16384")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # A backstop (64 MiB of WAL): submits checkpoint on their own, outside their write slot,
    # long before this (TaskStore._checkpoint_soon).
    cursor.execute("PRAGMA wal_autocheckpoint=4096")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_db_engine(url: str) -> Engine:
    """An Engine for `url`; SQLite files get their folder created and WAL mode switched on."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema up to `revision` with Alembic (idempotent)."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Transaction-scoped: released by the commit below, or by the server if this
            # process dies mid-migration. Waiters then find the schema already at head.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    log.info("database schema at %s", revision)
