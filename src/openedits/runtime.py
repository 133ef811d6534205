"""The Runtime: the wired-up parts one process uses (store, blobs, engine, fetcher, events)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import httpx
from sqlalchemy import Engine as DBEngine

from openedits._net import NetPolicy
from openedits.blobs import Blobs, create_blobs
from openedits.engines.base import Engine
from openedits.engines.registry import build_engine, resolve_engine_name
from openedits.imaging.fetch import Fetcher
from openedits.settings import Settings
from openedits.store.database import create_db_engine, migrate
from openedits.store.tasks import TaskStore
from openedits.store.tokens import KeyValueStore, TokenStore
from openedits.workers.events import EventBus

__all__ = ["Runtime"]

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Everything a task needs, built once per process and passed down explicitly."""

    settings: Settings
    db: DBEngine
    store: TaskStore
    tokens: TokenStore
    kv: KeyValueStore
    blobs: Blobs
    engine: Engine
    fetcher: Fetcher
    bus: EventBus
    clock: Callable[[], float] = time.time
    # Result PNGs encode here in parallel (zlib releases the GIL); kept for the process's life
    # because starting five threads per task cost more than the encoding on a busy machine.
    encoder: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=5, thread_name_prefix="png")
    )

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        engine: Engine | None = None,
        blobs: Blobs | None = None,
        fetch_transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        bus: EventBus | None = None,
    ) -> Runtime:
        """Connect, migrate and wire the parts; nothing here runs at import time.

        With a broker this process is an API node: the engine is only constructed (its name and
        capabilities check submits; workers load it), and events travel over Redis."""
        db = create_db_engine(settings.resolved_database_url)
        migrate(db)
        if engine is None and settings.scale_out:
            engine = build_engine(settings, resolve_engine_name(settings))
        elif engine is None and len(settings.devices) > 1:
            # The first device's copy; the dispatcher builds one for each further device.
            engine = build_engine(settings.model_copy(update={"device": settings.devices[0]}))
        if bus is None and settings.broker_url:
            from openedits.workers.redis_bus import RedisEventBus

            bus = RedisEventBus(settings.broker_url)
        return cls(
            settings=settings,
            db=db,
            store=TaskStore(db, clock=clock, inputs_dir=settings.inputs_dir),
            tokens=TokenStore(db, clock=clock),
            kv=KeyValueStore(db),
            blobs=blobs or create_blobs(settings.blobs_url, settings.files_dir, settings),
            engine=engine or build_engine(settings),
            fetcher=Fetcher(NetPolicy.from_settings(settings), transport=fetch_transport),
            bus=bus or EventBus(),
            clock=clock,
        )

    def for_device(self, settings: Settings, engine: Engine) -> Runtime:
        """This Runtime with another device's settings and engine; everything else shared."""
        return replace(self, settings=settings, engine=engine)

    def webhook_secret(self) -> str:
        """The `whsec_` secret callbacks are signed with: the configured one, else one generated
        on first use and kept in the store so every process and restart signs alike."""
        if self.settings.webhook_secret:
            return self.settings.webhook_secret
        return self.kv.get_or_create(
            "webhook_secret", lambda: "whsec_" + _b64(secrets.token_bytes(32))
        )

    def close(self) -> None:
        """Release the database pool and the encoder threads."""
        self.encoder.shutdown(wait=False)
        self.db.dispose()


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
