"""The webhook outbox: callbacks owed, claimed one attempt at a time under a lease; attempts."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, and_, delete, func, insert, or_, select, update
from sqlalchemy.sql.elements import ColumnElement

from openedits.store._tables import webhook_attempts, webhook_deliveries

__all__ = [
    "AttemptRecord",
    "Candidate",
    "Claim",
    "Delivery",
    "DeliveryState",
    "Outbox",
    "Outcome",
    "encode_body",
    "new_message_id",
    "owe_callback",
]

_d = webhook_deliveries
_a = webhook_attempts


class DeliveryState(StrEnum):
    """Where a callback is: still owed, received by a 2xx, or given up (schedule spent, or 410)."""

    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class Outcome(StrEnum):
    """How one attempt ended."""

    delivered = "delivered"  # 2xx
    retry = "retry"  # any other answer or no answer; another attempt is scheduled
    gone = "gone"  # 410: the receiver asked us to stop
    failed = "failed"  # a failure after the last scheduled attempt: given up


def new_message_id() -> str:
    """A fresh `webhook-id` (the Standard Webhooks `msg_` form)."""
    return "msg_" + uuid.uuid4().hex


def encode_body(body: dict[str, Any]) -> str:
    """The exact text a callback carries; computed once, so every retry signs the same bytes."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def owe_callback(
    conn: Connection, *, task_id: str, url: str, body: dict[str, Any], now: float
) -> str:
    """Insert a pending delivery on `conn`, inside the caller's transaction (the task's end), so
    the callback is in the store before anyone can see the task finished. Returns its id."""
    delivery_id = new_message_id()
    conn.execute(
        insert(_d).values(
            id=delivery_id,
            task_id=task_id,
            url=url,
            body=encode_body(body),
            state=DeliveryState.pending.value,
            attempts=0,
            failures=0,
            next_attempt_at=now,
            lease_owner=None,
            created_at=now,
        )
    )
    return delivery_id


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt at a delivery."""

    number: int
    node: str
    started_at: float
    duration_ms: float | None
    status: int | None
    outcome: str | None  # None: in flight, or its process died mid-attempt
    error: str | None

    def to_json(self) -> dict[str, Any]:
        """The attempt as the admin API shows it."""
        return {
            "number": self.number,
            "node": self.node,
            "started_at": self.started_at,
            "duration_ms": self.duration_ms,
            "status": self.status,
            "outcome": self.outcome or "interrupted",
            "error": self.error,
        }


@dataclass(frozen=True)
class Delivery:
    """A snapshot of one outbox row."""

    id: str
    task_id: str
    url: str
    body: str
    state: DeliveryState
    attempts: int
    failures: int
    next_attempt_at: float | None
    lease_owner: str | None
    created_at: float
    last_attempt_at: float | None
    delivered_at: float | None
    last_status: int | None
    last_error: str | None

    @classmethod
    def from_mapping(cls, m: Any) -> Delivery:
        """Build from a SQLAlchemy row mapping."""
        values = dict(m)
        values["state"] = DeliveryState(values["state"])
        return cls(**values)

    def to_json(self, history: Sequence[AttemptRecord] = ()) -> dict[str, Any]:
        """The delivery as the admin API shows it, with its attempts."""
        return {
            "id": self.id,
            "task_id": self.task_id,
            "url": self.url,
            "state": self.state.value,
            "attempt_count": self.attempts,
            "created_at": self.created_at,
            "next_attempt_at": (
                self.next_attempt_at if self.state is DeliveryState.pending else None
            ),
            "last_attempt_at": self.last_attempt_at,
            "delivered_at": self.delivered_at,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "body": json.loads(self.body),
            "attempts": [a.to_json() for a in history],
        }


@dataclass(frozen=True)
class Candidate:
    """A delivery that was due when read: what a claim needs, and where it would go."""

    id: str
    attempts: int
    url: str


def _not_to(origins: Sequence[str]) -> list[ColumnElement[bool]]:
    """Conditions leaving out URLs at any of `origins` (`scheme://authority` as written, matched
    literally): the origin itself, or followed by a path, query or fragment, so that
    `http://h:1` never leaves out `http://h:12/` or `http://h:1.example/`."""
    conditions = []
    for origin in origins:
        at = or_(
            _d.c.url == origin,
            *(_d.c.url.startswith(origin + mark, autoescape=True) for mark in "/?#"),
        )
        conditions.append(~at)
    return conditions


@dataclass(frozen=True)
class Claim:
    """The right to make attempt `number` of a delivery, held by `node` until `lease_until`."""

    delivery: Delivery
    number: int
    node: str
    lease_until: float


class Outbox:
    """The outbox rows in SQL. Thread- and process-safe: each claim is one guarded UPDATE."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock

    # --- reading

    def get(self, delivery_id: str) -> Delivery | None:
        """One delivery, or None."""
        with self.engine.connect() as conn:
            m = conn.execute(select(_d).where(_d.c.id == delivery_id)).mappings().first()
        return Delivery.from_mapping(m) if m else None

    def for_task(self, task_id: str) -> list[Delivery]:
        """The deliveries owed for one task (normally one), oldest first."""
        query = select(_d).where(_d.c.task_id == task_id).order_by(_d.c.created_at)
        with self.engine.connect() as conn:
            return [Delivery.from_mapping(m) for m in conn.execute(query).mappings()]

    def page(
        self,
        *,
        state: DeliveryState | None = None,
        task_id: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> tuple[list[Delivery], int]:
        """A page of deliveries, newest first, and how many match."""
        conditions = []
        if state is not None:
            conditions.append(_d.c.state == state.value)
        if task_id is not None:
            conditions.append(_d.c.task_id == task_id)
        where = and_(True, *conditions)
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(_d).where(where)).scalar_one()
            rows = conn.execute(
                select(_d)
                .where(where)
                .order_by(_d.c.created_at.desc(), _d.c.id)
                .offset(offset)
                .limit(limit)
            ).mappings()
            return [Delivery.from_mapping(m) for m in rows], int(total)

    def history(self, delivery_ids: Sequence[str]) -> dict[str, list[AttemptRecord]]:
        """The attempts of each delivery, in order."""
        found: dict[str, list[AttemptRecord]] = {d: [] for d in delivery_ids}
        if not found:
            return found
        query = (
            select(_a).where(_a.c.delivery_id.in_(list(found))).order_by(_a.c.number)
        )
        with self.engine.connect() as conn:
            for m in conn.execute(query).mappings():
                values = dict(m)
                found[values.pop("delivery_id")].append(AttemptRecord(**values))
        return found

    def pending_count(self) -> int:
        """Deliveries still owed (neither delivered nor given up): one indexed count, cheap
        enough for every metrics scrape."""
        query = select(func.count()).select_from(_d).where(
            _d.c.state == DeliveryState.pending.value
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def next_due(self, *, exclude_origins: Sequence[str] = ()) -> float | None:
        """When the earliest pending delivery falls due (None when none is owed), leaving out
        URLs that start with any of `exclude_origins`."""
        query = select(func.min(_d.c.next_attempt_at)).where(
            _d.c.state == DeliveryState.pending.value, *_not_to(exclude_origins)
        )
        with self.engine.connect() as conn:
            value = conn.execute(query).scalar_one_or_none()
        return float(value) if value is not None else None

    # --- claiming and recording

    def due(self, *, limit: int, exclude_origins: Sequence[str] = ()) -> list[Candidate]:
        """Up to `limit` deliveries due now, earliest first, leaving out URLs that start with
        any of `exclude_origins` (destinations the caller will not send to at the moment).
        Only a hint: `claim` decides, atomically, who makes each attempt."""
        now = self.clock()
        query = (
            select(_d.c.id, _d.c.attempts, _d.c.url)
            .where(
                _d.c.state == DeliveryState.pending.value,
                _d.c.next_attempt_at <= now,
                *_not_to(exclude_origins),
            )
            .order_by(_d.c.next_attempt_at, _d.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [Candidate(*row) for row in conn.execute(query).all()]

    def claim_due(self, node: str, *, limit: int, lease_seconds: float) -> list[Claim]:
        """Claim up to `limit` deliveries that are due, each for its next attempt."""
        claims = []
        for candidate in self.due(limit=limit):
            claim = self.claim(candidate.id, node, seen_attempts=candidate.attempts,
                               lease_seconds=lease_seconds)
            if claim is not None:
                claims.append(claim)
        return claims

    def claim(
        self, delivery_id: str, node: str, *, seen_attempts: int, lease_seconds: float
    ) -> Claim | None:
        """Take attempt `seen_attempts + 1` of a due delivery, or None when another process
        took it first.

        The UPDATE's WHERE re-checks state, due time and the attempt count in the same atomic
        step as it writes (compare-and-set, as TaskStore._transition does), and pushes the due
        time past the lease, so no other process can claim the row while this attempt is in
        flight; if this process dies, the row falls due again when the lease runs out and the
        next attempt gets the next number. The attempt row's primary key backs that up.
        On PostgreSQL (READ COMMITTED) a second UPDATE of the same row waits for the first to
        commit and then re-evaluates its WHERE on the new row version, where `attempts` has
        moved on, so it matches nothing: the same guarantee as SQLite's single writer, with no
        row lock held beyond this short transaction (which a SELECT … FOR UPDATE would add).
        """
        now = self.clock()
        number = seen_attempts + 1
        lease_until = now + lease_seconds
        with self.engine.begin() as conn:
            result = conn.execute(
                update(_d)
                .where(
                    _d.c.id == delivery_id,
                    _d.c.state == DeliveryState.pending.value,
                    _d.c.next_attempt_at <= now,
                    _d.c.attempts == seen_attempts,
                )
                .values(
                    attempts=number,
                    next_attempt_at=lease_until,
                    lease_owner=node,
                    last_attempt_at=now,
                )
            )
            if result.rowcount != 1:
                return None
            conn.execute(
                insert(_a).values(delivery_id=delivery_id, number=number, node=node,
                                  started_at=now)
            )
            m = conn.execute(select(_d).where(_d.c.id == delivery_id)).mappings().one()
        return Claim(Delivery.from_mapping(m), number, node, lease_until)

    def record(
        self,
        claim: Claim,
        *,
        outcome: Outcome,
        status: int | None,
        error: str | None,
        duration_ms: float,
        next_attempt_at: float | None = None,
    ) -> bool:
        """Write how an attempt went, and move the delivery on (delivered, failed, or due again
        at `next_attempt_at`). Returns False when the lease was lost meanwhile: the attempt is
        still recorded, but the delivery is left to whoever holds it now."""
        now = self.clock()
        values: dict[str, Any] = {
            "lease_owner": None,
            "last_status": status,
            "last_error": error,
        }
        if outcome is Outcome.delivered:
            values.update(state=DeliveryState.delivered.value, delivered_at=now,
                          next_attempt_at=None)
        elif outcome is Outcome.retry:
            if next_attempt_at is None:
                raise ValueError("a retry needs next_attempt_at")
            values.update(failures=_d.c.failures + 1, next_attempt_at=next_attempt_at)
        else:
            values.update(state=DeliveryState.failed.value, failures=_d.c.failures + 1,
                          next_attempt_at=None)
        with self.engine.begin() as conn:
            conn.execute(
                update(_a)
                .where(_a.c.delivery_id == claim.delivery.id, _a.c.number == claim.number)
                .values(outcome=outcome.value, status=status, error=error,
                        duration_ms=round(duration_ms, 3))
            )
            result = conn.execute(
                update(_d)
                .where(
                    _d.c.id == claim.delivery.id,
                    _d.c.state == DeliveryState.pending.value,
                    _d.c.lease_owner == claim.node,
                    _d.c.attempts == claim.number,
                )
                .values(**values)
            )
            return result.rowcount == 1

    # --- retention

    def prune(self, cutoff: float, *, batch: int = 500) -> int:
        """Delete deliveries that ended before `cutoff` (Unix seconds), with their attempts;
        returns how many went. A delivered one ended when it was delivered; a failed one (its
        schedule spent, or a 410) with its last attempt. Pending ones are never deleted: they
        are still owed, and their schedule ends them within days. Each batch is one
        transaction that re-checks the state in its DELETE, so a delivery re-sent meanwhile
        stays, attempts and all."""
        ended = or_(
            and_(_d.c.state == DeliveryState.delivered.value, _d.c.delivered_at < cutoff),
            and_(_d.c.state == DeliveryState.failed.value, _d.c.last_attempt_at < cutoff),
        )
        pruned = 0
        while True:
            with self.engine.begin() as conn:
                ids = list(conn.execute(select(_d.c.id).where(ended).limit(batch)).scalars())
                if ids:
                    result = conn.execute(delete(_d).where(_d.c.id.in_(ids), ended))
                    pruned += result.rowcount
                    gone = ~select(_d.c.id).where(_d.c.id == _a.c.delivery_id).exists()
                    conn.execute(delete(_a).where(_a.c.delivery_id.in_(ids), gone))
            if len(ids) < batch:
                return pruned

    def resend(self, delivery_id: str) -> Delivery | None:
        """Queue a delivery again, due now, with a fresh retry schedule and the same webhook-id.

        A failed or delivered one becomes pending; a pending one not in flight falls due now;
        one in flight is left alone. None when there is no such delivery."""
        now = self.clock()
        ended = [DeliveryState.failed.value, DeliveryState.delivered.value]
        with self.engine.begin() as conn:
            conn.execute(
                update(_d)
                .where(
                    _d.c.id == delivery_id,
                    or_(
                        _d.c.state.in_(ended),
                        and_(
                            _d.c.state == DeliveryState.pending.value,
                            or_(_d.c.lease_owner.is_(None), _d.c.next_attempt_at <= now),
                        ),
                    ),
                )
                .values(
                    state=DeliveryState.pending.value,
                    failures=0,
                    next_attempt_at=now,
                    lease_owner=None,
                )
            )
        return self.get(delivery_id)
