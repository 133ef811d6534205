"""The one Settings object: every knob, read from `OPENEDITS_*` environment variables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as `5s`, `30m`, `2h`, `250ms` or a bare number of seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration; use forms such as 5s, 30m, 2h, 250ms")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class Settings(BaseSettings):
    """Configuration of one openedits process.

    The operator-facing names are flat (`OPENEDITS_DATABASE_URL`, not a nested delimiter)
    because DESIGN.md publishes them; fields are grouped below by concern instead.
    """

    model_config = SettingsConfigDict(env_prefix="OPENEDITS_", extra="ignore")

    # --- storage
    data_dir: Path = Path("./openedits-data")
    database_url: str | None = None
    blobs_url: str | None = None
    public_url: str | None = None
    retention_days: float = 30.0
    # S3 results: links at this base (a CDN or public bucket), else presigned for this many
    # seconds (0: links point at this server's /files/..., which reads the bucket).
    blobs_public_url: str | None = None
    blobs_presign_seconds: int = Field(default=0, ge=0, le=7 * 86400)
    blobs_addressing_style: Literal["path", "virtual", "auto"] = "path"

    # --- workers and queue
    broker_url: str | None = None
    workers_per_device: int = Field(default=1, ge=1, le=64)
    # The input stage: threads that fetch and decode tasks' inputs ahead of the device, and how
    # many of them one token's tasks may hold at once (so its slow URLs cannot hold them all).
    input_threads: int = Field(default=4, ge=1, le=64)
    inputs_per_owner: int = Field(default=2, ge=1, le=64)
    lease_seconds: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    reaper_interval_seconds: float = Field(default=5.0, gt=0)
    sync_timeout_seconds: float = Field(default=900.0, gt=0)
    queue_max: int = Field(default=1000, ge=1)
    # Celery over Redis: a message not acknowledged within this time is handed out again, so it
    # must exceed the longest task (tasks are stopped a minute before it).
    visibility_timeout_seconds: float = Field(default=7200.0, ge=120)

    # --- engines
    engine: Literal["auto", "opencv", "diffusers", "upstream"] = "auto"
    diffusers_model: str | None = None
    # A second checkpoint for masked requests (e.g. FLUX.1 Fill); both stay loaded.
    diffusers_mask_model: str | None = None
    # Attention slicing and VAE tiling: "auto" turns them on when device memory is short.
    diffusers_memory_saving: Literal["auto", "on", "off"] = "auto"
    # Memory and speed, one setting each; refused at load where the device or family cannot.
    diffusers_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    diffusers_offload: Literal["none", "model", "sequential", "group"] = "none"
    diffusers_quantization: Literal["none", "fp8", "int8", "nf4"] = "none"
    diffusers_compile: bool = False
    diffusers_cache: Literal["none", "first-block", "taylorseer"] = "none"
    # Comma-separated SOURCE[?weight_name=FILE&scale=1.0&steps=8]; see docs/diffusers.md.
    diffusers_loras: str = ""
    device: str = "auto"
    upstream_url: str | None = None
    upstream_token: str | None = None

    # --- auth and abuse controls
    api_tokens: str = ""
    rate_limit: str = "60/minute"
    rate_limit_reads: str = "600/minute"
    rate_limit_storage_url: str = "memory://"
    moderation_words: str = ""

    # --- client URLs and input limits
    allow_private_urls: bool = False
    fetch_timeout_seconds: float = Field(default=20.0, gt=0)
    max_redirects: int = Field(default=3, ge=0, le=10)
    max_body_bytes: int = Field(default=40_000_000, gt=0)
    # Bytes of request bodies held in memory at once, across all requests: a body that would
    # pass it waits up to body_wait_seconds for room, then gets 503 with Retry-After.
    max_body_bytes_in_flight: int = Field(default=100_000_000, gt=0)
    body_wait_seconds: float = Field(default=5.0, ge=0)
    max_image_bytes: int = Field(default=20_000_000, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    max_side: int = Field(default=2048, ge=64)
    max_prompt_chars: int = Field(default=4000, ge=1)

    # --- webhooks
    webhook_secret: str | None = None
    webhook_retry_delays: str = "5s,5m,30m,2h,5h,10h,14h,20h,24h"
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_poll_seconds: float = Field(default=1.0, gt=0)

    # --- server
    host: str = "127.0.0.1"
    port: int = 8000
    # Behind a reverse proxy, the addresses whose X-Forwarded-For is trusted (uvicorn's
    # forwarded_allow_ips), so rate limits by address see clients, not the proxy.
    forwarded_allow_ips: str = "127.0.0.1"
    log_level: str = "INFO"
    # Connections (api/server.py): a socket that has not sent a whole request head this long
    # after it opened, or after its last reply, is closed; so is one whose body stalls; past
    # max_connections a new connection gets a fast 503 instead of a slot.
    max_connections: int = Field(default=1000, ge=1)
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    body_timeout_seconds: float = Field(default=30.0, gt=0)
    keep_alive_seconds: int = Field(default=5, ge=1)
    # Host header values trusted to form result URLs besides the bind host, localhost,
    # loopback and OPENEDITS_PUBLIC_URL's host (comma-separated names, `*.example.com`, or `*`).
    allowed_hosts: str = ""
    # "text" for people, "json" (one object a line) for log stores.
    log_format: Literal["text", "json"] = "text"
    # Seconds running tasks get to finish after SIGTERM/SIGINT before they go back to pending.
    drain_seconds: float = Field(default=30.0, ge=0)

    # --- operations
    # When set, GET /metrics needs `authorization: Bearer <it>` (or an admin token) from
    # anywhere; unset, it answers loopback clients and admin tokens only.
    metrics_token: str | None = None
    # Worker processes (which serve no API) export their metrics on this port when set.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)

    @field_validator("webhook_retry_delays")
    @classmethod
    def _check_delays(cls, value: str) -> str:
        for part in value.split(","):
            parse_duration(part)
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.broker_url:
            self._check_scale_out()
        if self.engine == "upstream" and not self.upstream_url:
            raise ValueError(
                "OPENEDITS_ENGINE=upstream needs OPENEDITS_UPSTREAM_URL (the server to forward to)"
            )
        if self.diffusers_mask_model and not self.diffusers_model:
            raise ValueError(
                "OPENEDITS_DIFFUSERS_MASK_MODEL takes only masked requests; set "
                "OPENEDITS_DIFFUSERS_MODEL too (the model for requests without a mask)"
            )
        if self.engine == "diffusers" and not self.diffusers_model:
            raise ValueError(
                "OPENEDITS_ENGINE=diffusers needs OPENEDITS_DIFFUSERS_MODEL "
                "(a local diffusers folder or a hub id)"
            )
        return self

    def _check_scale_out(self) -> None:
        """Refuse, at start, a broker configuration whose parts cannot be shared by processes
        on other machines, saying what to set instead."""
        assert self.broker_url is not None
        if not self.broker_url.startswith(("redis://", "rediss://")):
            raise ValueError(
                f"OPENEDITS_BROKER_URL={self.broker_url!r} is not a Redis URL; set "
                "redis://host:6379/0 (or rediss:// for TLS), or unset it for in-process workers"
            )
        if self.resolved_database_url.startswith("sqlite"):
            raise ValueError(
                "OPENEDITS_BROKER_URL is set but the task store is SQLite, a file that API nodes "
                "and workers on other machines cannot share; set OPENEDITS_DATABASE_URL="
                "postgresql+psycopg://user:password@host:5432/openedits"
            )
        if not self.blobs_url:
            raise ValueError(
                "OPENEDITS_BROKER_URL is set but results would go to a local folder that API "
                "nodes on other machines cannot read; set OPENEDITS_BLOBS_URL=s3://bucket/prefix "
                "(with AWS_ENDPOINT_URL and keys for a non-AWS store), or "
                "OPENEDITS_BLOBS_URL=file:///path if every node mounts the same shared folder"
            )
        if self.lease_seconds * 2 >= self.visibility_timeout_seconds:
            raise ValueError(
                f"OPENEDITS_VISIBILITY_TIMEOUT_SECONDS={self.visibility_timeout_seconds:g} must "
                f"be well above OPENEDITS_LEASE_SECONDS={self.lease_seconds:g} (the lease brings "
                "back a dead worker's task; the visibility timeout is only the broker's backstop)"
            )
        if self.rate_limit_storage_url == "memory://":
            # Counters in one node's memory would give each API node its own budget.
            self.rate_limit_storage_url = self.broker_url

    @property
    def devices(self) -> list[str]:
        """The devices OPENEDITS_DEVICE lists (`cuda:0,cuda:1`): one engine copy and one
        worker each."""
        found = [d.strip() for d in self.device.split(",") if d.strip()]
        return found or ["auto"]

    @property
    def scale_out(self) -> bool:
        """True when tasks go to Celery workers (this process is an API node or a worker)."""
        return bool(self.broker_url)

    @property
    def bootstrap_tokens(self) -> list[str]:
        """Tokens from OPENEDITS_API_TOKENS, accepted with every scope."""
        return [t.strip() for t in self.api_tokens.split(",") if t.strip()]

    @property
    def retry_delays(self) -> list[float]:
        """The waits between callback attempts, in seconds."""
        return [parse_duration(p) for p in self.webhook_retry_delays.split(",")]

    @property
    def moderation_list(self) -> list[str]:
        """Lower-cased words whose presence in a prompt refuses it."""
        return [w.strip().lower() for w in self.moderation_words.split(",") if w.strip()]

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL of the task store (SQLite in the data dir by default)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'openedits.db').resolve()}"

    @property
    def inputs_dir(self) -> Path | None:
        """Where a SQLite store keeps inline inputs, one file per live task; None for a
        server database (its workers may be on other machines: inputs stay in the database)."""
        if self.resolved_database_url.startswith("sqlite"):
            return self.data_dir / "inputs"
        return None

    @property
    def files_dir(self) -> Path:
        """The local folder result files go to by default."""
        return self.data_dir / "files"
