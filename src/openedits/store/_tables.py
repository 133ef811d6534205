"""The SQL tables of the task store, declared once for the ORM-free core and for Alembic."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

__all__ = [
    "kv",
    "metadata",
    "task_payloads",
    "tasks",
    "tokens",
    "webhook_attempts",
    "webhook_deliveries",
]

metadata = MetaData()

tasks = Table(
    "tasks",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("trace_id", String(36), nullable=False),
    Column("state", String(16), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("request", JSON, nullable=False),
    Column("response", JSON, nullable=True),
    Column("error_status", Integer, nullable=True),
    Column("progress", Integer, nullable=False, default=0),
    Column("base_url", Text, nullable=False),
    Column("callback_url", Text, nullable=True),
    Column("seeds", JSON, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("idempotency_key", String(255), nullable=True),
    Column("request_hash", String(64), nullable=True),
    # Seconds per phase (queue, inputs, engine, results, total), set when the task ends.
    Column("timings", JSON, nullable=True),
    # What the server did differently for this task (e.g. an out-of-memory retry), for the record.
    Column("notes", JSON, nullable=True),
    UniqueConstraint("owner", "idempotency_key", name="uq_tasks_owner_idempotency_key"),
    Index("ix_tasks_queue", "state", "priority", "created_at"),
    Index("ix_tasks_owner_created", "owner", "created_at"),
    Index("ix_tasks_trace_id", "trace_id"),
)

# The submit body exactly as sent (data: URIs inline), kept apart from `tasks` so listing
# tasks never drags megabytes of base64 along; deleted when the task ends.
task_payloads = Table(
    "task_payloads",
    metadata,
    Column("task_id", String(36), primary_key=True),
    Column("body", JSON, nullable=False),
    # Inline inputs as raw bytes (decoded from their data: URIs), so the body need not carry
    # megabytes of base64; how they are packed is the submit path's business.
    Column("data", LargeBinary, nullable=True),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
    Column("scopes", String(255), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

kv = Table(
    "kv",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# The webhook outbox: one row per callback owed, written in the same transaction as the task's
# end, so a callback can never be lost between "finished" and "sent".
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(64), primary_key=True),  # the `webhook-id`, the same on every retry
    Column("task_id", String(36), nullable=False),
    Column("url", Text, nullable=False),
    # The body as the exact text that is signed and sent, so every retry is byte-identical.
    Column("body", Text, nullable=False),
    Column("state", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False, default=0),  # ever made; numbers the attempts
    Column("failures", Integer, nullable=False, default=0),  # since (re)queued: schedule slot
    Column("next_attempt_at", Float, nullable=True),
    Column("lease_owner", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("last_attempt_at", Float, nullable=True),
    Column("delivered_at", Float, nullable=True),
    Column("last_status", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
    Index("ix_webhook_deliveries_task", "task_id"),
)

# Every attempt and how it went; the primary key makes "attempt n of delivery d" happen once,
# whatever number of processes run the delivery loop.
webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("delivery_id", String(64), primary_key=True),
    Column("number", Integer, primary_key=True),
    Column("node", String(64), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("duration_ms", Float, nullable=True),
    Column("status", Integer, nullable=True),
    # delivered | retry | gone | failed; null while sending (or its process died meanwhile)
    Column("outcome", String(16), nullable=True),
    Column("error", Text, nullable=True),
)
