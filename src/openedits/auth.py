"""Who is calling: bearer tokens (bootstrap ones from settings, stored ones hashed) and scopes."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from openedits.errors import TokenInvalid, TokenMismatched
from openedits.store.tokens import SCOPES, TokenStore

__all__ = ["Authenticator", "Caller"]


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: an owner id for its tasks, and what it may do."""

    token_id: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        """Admins see every task."""
        return "admin" in self.scopes

    def require(self, scope: str) -> None:
        """Raise TokenMismatched unless this caller holds `scope` (admin holds all)."""
        if scope not in self.scopes and not self.is_admin:
            held = ", ".join(sorted(self.scopes)) or "none"
            raise TokenMismatched(
                f"this token has scopes [{held}]; this endpoint needs the '{scope}' scope. "
                f"Create one with: openedits tokens create --scope {scope}"
            )


def _shape(scheme: str, credentials: str) -> str:
    """What a wrong authorization header looks like, without a byte of its credentials: the
    header may hold a real password or token (Basic, a bare token), and errors are logged."""
    if not credentials:
        if scheme.lower() == "bearer":
            return "'Bearer' with no token after it"
        return f"one word of {len(scheme)} characters and no scheme (a bare token? send it as "\
            "'Bearer <token>')"
    if scheme.isascii() and scheme.isalpha() and len(scheme) <= 20:
        return f"the {scheme!r} scheme; only Bearer tokens are accepted"
    return "another scheme; only Bearer tokens are accepted"


class Authenticator:
    """Turns an `authorization` header into a Caller, or raises TokenInvalid."""

    def __init__(self, bootstrap_tokens: list[str], store: TokenStore) -> None:
        # Bootstrap tokens get a stable owner id derived from the token, so tasks stay
        # visible to the same token across restarts without storing it.
        self._bootstrap = {
            t: "env_" + hashlib.sha256(t.encode()).hexdigest()[:12] for t in bootstrap_tokens
        }
        self._store = store

    def bootstrap_caller(self, authorization: str | None) -> Caller | None:
        """The caller when the header holds a bootstrap token, else None: a check that needs
        no store lookup, so the API can make it without a thread."""
        if not authorization or not self._bootstrap:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        token = token.strip()
        for known, owner in self._bootstrap.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return Caller(token_id=owner, scopes=frozenset(SCOPES))
        return None

    def authenticate(self, authorization: str | None) -> Caller:
        """Check the header's bearer token."""
        if not authorization:
            raise TokenInvalid(
                "the authorization header is missing; send 'authorization: Bearer <token>'"
            )
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise TokenInvalid(
                f"the authorization header must be 'Bearer <token>', got {_shape(scheme, token)}"
            )
        for known, owner in self._bootstrap.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return Caller(token_id=owner, scopes=frozenset(SCOPES))
        info = self._store.lookup(token)
        if info is None:
            raise TokenInvalid("the token is unknown or revoked")
        return Caller(token_id=info.id, scopes=frozenset(info.scopes))
