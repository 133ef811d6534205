"""TokenStore: API tokens at rest, hashed, with scopes and revocation."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from openedits.store._tables import kv, tokens

__all__ = ["SCOPES", "KeyValueStore", "TokenInfo", "TokenStore", "hash_token"]

SCOPES = ("edits", "tasks", "admin")


def hash_token(token: str) -> str:
    """The SHA-256 of a token: tokens are random and long, so a plain hash is enough at rest."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    """A stored token, without its secret."""

    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: float
    revoked_at: float | None


class TokenStore:
    """Create, look up, list and revoke tokens."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock

    def create(self, name: str, scopes: Iterable[str]) -> tuple[str, TokenInfo]:
        """Store a new token; returns its secret (shown once) and its record."""
        scope_list = tuple(dict.fromkeys(scopes))
        unknown = [s for s in scope_list if s not in SCOPES]
        if unknown or not scope_list:
            raise ValueError(
                f"scopes {unknown or '[]'} not allowed; choose from {', '.join(SCOPES)}"
            )
        secret = "oe_" + secrets.token_urlsafe(32)
        info = TokenInfo(
            id="tok_" + secrets.token_hex(6),
            name=name,
            scopes=scope_list,
            created_at=self.clock(),
            revoked_at=None,
        )
        with self.engine.begin() as conn:
            conn.execute(
                insert(tokens).values(
                    id=info.id,
                    name=name,
                    hash=hash_token(secret),
                    scopes=",".join(scope_list),
                    created_at=info.created_at,
                )
            )
        return secret, info

    def lookup(self, secret: str) -> TokenInfo | None:
        """The live (unrevoked) token with this secret, or None."""
        query = select(tokens).where(tokens.c.hash == hash_token(secret))
        with self.engine.connect() as conn:
            m = conn.execute(query).mappings().first()
        if m is None or m["revoked_at"] is not None:
            return None
        return self._info(m)

    def list(self) -> list[TokenInfo]:
        """Every token, revoked ones included, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(tokens).order_by(tokens.c.created_at)).mappings()
            return [self._info(m) for m in rows]

    def revoke(self, token_id: str) -> bool:
        """Revoke by id; False when there is no such live token."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(tokens)
                .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=self.clock())
            )
            return result.rowcount == 1

    @staticmethod
    def _info(m: object) -> TokenInfo:
        row = dict(m)  # type: ignore[call-overload]
        return TokenInfo(
            id=row["id"],
            name=row["name"],
            scopes=tuple(s for s in row["scopes"].split(",") if s),
            created_at=row["created_at"],
            revoked_at=row["revoked_at"],
        )


class KeyValueStore:
    """Small named values the server keeps across restarts (the webhook secret)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, key: str) -> str | None:
        """The value, or None."""
        with self.engine.connect() as conn:
            value = conn.execute(select(kv.c.value).where(kv.c.key == key)).scalar_one_or_none()
        return value

    def get_or_create(self, key: str, factory: Callable[[], str]) -> str:
        """The value, created by `factory` the first time; concurrent creators agree."""
        existing = self.get(key)
        if existing is not None:
            return existing
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(kv).values(key=key, value=factory()))
        except IntegrityError:
            # Another process won the race; its value is the one to keep.
            pass
        value = self.get(key)
        assert value is not None
        return value
