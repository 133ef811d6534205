"""Intake: a submit body made ready to store (sources checked, inline inputs as bytes, a bounded
record of the request, the idempotency hash), without copying its megabytes more than once."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from openedits._net import NetPolicy, check_url
from openedits.errors import ImageTooLarge, InvalidInput, describe_value
from openedits.imaging.fetch import Fetcher
from openedits.store.tasks import InlineInput

__all__ = [
    "KNOWN_FIELDS",
    "MAX_URL_CHARS",
    "RECORD_UNKNOWN_BYTES",
    "Source",
    "bounded_request",
    "check_source",
    "check_url_syntax",
    "request_hash",
]

KNOWN_FIELDS = frozenset(
    {"image_url", "prompt", "action", "mask", "mode", "split_images", "callback_url", "async",
     "seed"}
)
MAX_URL_CHARS = 8192
"""The longest URL accepted in image_url, mask or callback_url (signed URLs run to ~2,000)."""
RECORD_UNKNOWN_BYTES = 4096
"""How much of a record's `request` unknown keys may fill, as JSON."""
_KEEP_CHARS = 200
"""An unknown string value longer than _TRIM_OVER keeps its first _KEEP_CHARS and a digest."""
_TRIM_OVER = 256
_KEEP_ITEMS = 16
_OMITTED_KEY = "…"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


@dataclass(frozen=True)
class Source:
    """A checked image_url or mask: an http(s) URL, or inline bytes with their digest."""

    field: str
    url: str | None = None
    inline: InlineInput | None = None
    sha256: str = ""
    chars: int = 0

    def recorded(self) -> str:
        """How the task record shows it: the URL, or a short digest of the inline text."""
        if self.url is not None:
            return self.url
        assert self.inline is not None
        prefix = self.inline.prefix.rstrip(",")
        head = f"{prefix},…" if prefix else "base64…"
        return f"{head}sha256:{self.sha256[:16]} ({self.chars} chars)"


def _allowed(allow_bare_base64: bool) -> str:
    if allow_bare_base64:
        return "an http(s) URL, a data:image/...;base64, URI or bare base64"
    return "an http(s) URL or a data:image/...;base64, URI"


def check_url_syntax(value: str, *, field: str) -> str:
    """The URL, stripped, if it is one openedits could fetch or call (http or https in any
    case, a host, at most MAX_URL_CHARS); InvalidInput naming the field otherwise. Addresses
    are judged where the URL is used (the fetch, the callback's delivery)."""
    url = value.strip()
    if not url:
        raise InvalidInput(f"{field} is empty; give an http(s) URL such as https://example.com/a")
    if len(url) > MAX_URL_CHARS:
        raise InvalidInput(
            f"{field} is a URL of {len(url):,} characters; at most {MAX_URL_CHARS:,} are "
            "accepted (send a shorter link, or the image inline)"
        )
    check_url(url, field=field, policy=NetPolicy(allow_private=True))
    return url


def check_source(
    value: str, *, field: str, allow_bare_base64: bool, fetcher: Fetcher
) -> Source:
    """Check an image_url or mask value at submit, the same way for every such field.

    URLs get their syntax checked (check_url_syntax); data: URIs (`data:` in any case) and,
    where allowed, bare base64 are decoded here, so a bad or oversized inline input is
    refused before any task exists, and the bytes are stored instead of the base64 text.
    """
    text = value.strip()
    if not text:
        raise InvalidInput(f"{field} is empty; give {_allowed(allow_bare_base64)}")
    is_data = text[:5].lower() == "data:"
    if not is_data and (_SCHEME.match(text) or not allow_bare_base64):
        if not _SCHEME.match(text):
            raise InvalidInput(
                f"{field} {describe_value(value)} is not a URL; give {_allowed(allow_bare_base64)}"
            )
        return Source(field, url=check_url_syntax(text, field=field))
    prefix, payload, declared_base64 = "", text, True
    if is_data:
        head, comma, payload = text.partition(",")
        prefix = head + comma
        params = [p.strip().lower() for p in head[5:].split(";")[1:]]
        declared_base64 = bool(comma) and "base64" in params
    encoded = _canonical_base64(payload) if declared_base64 else None
    limit = fetcher.policy.max_bytes
    if encoded is None or not encoded or _decoded_size(encoded) > limit:
        # Anything but plain, padded, standard base64 within the limit: the fetcher reads
        # what it can (URL-safe alphabet, whitespace, missing padding) and words every
        # refusal; what it reads is kept re-encoded in the standard form.
        if len(payload) // 4 * 3 > limit + 2:
            raise ImageTooLarge(
                f"{field} is about {len(payload) // 4 * 3:,} bytes, over the limit of "
                f"{limit:,} (OPENEDITS_MAX_IMAGE_BYTES); send a smaller file"
            )
        data = fetcher.fetch(text, field=field, allow_bare_base64=allow_bare_base64)
        encoded = base64.b64encode(data)
    digest = hashlib.sha256(encoded).hexdigest()
    return Source(field, inline=InlineInput(prefix, encoded), sha256=digest, chars=len(text))


_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _canonical_base64(payload: str) -> bytes | None:
    """`payload` as ASCII bytes when it is standard, padded base64; None when it is not.

    Checked without decoding and without copying: deleting every alphabet character must
    leave exactly the padding. That costs a third of decoding, which the worker does anyway
    when it reads the image, so the text is stored as it came rather than decoded twice.
    """
    if not payload.isascii() or len(payload) % 4:
        return None
    encoded = payload.encode("ascii")
    padding = b"==" if encoded.endswith(b"==") else b"=" if encoded.endswith(b"=") else b""
    if encoded.translate(None, _ALPHABET) != padding:
        return None
    return encoded


def _decoded_size(encoded: bytes) -> int:
    return len(encoded) // 4 * 3 - (2 if encoded.endswith(b"==") else encoded.endswith(b"="))


def request_hash(body: Mapping[str, Any], sources: Mapping[str, Source]) -> str:
    """What an idempotent retry must repeat: every key and value of the body, with inline
    inputs standing in by their full digest (hashed once, when they were checked)."""
    canonical = {
        k: (f"sha256:{sources[k].sha256}" if k in sources and sources[k].inline else v)
        for k, v in body.items()
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _digest_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _trim(value: Any, depth: int = 0) -> Any:
    """A small stand-in for an unknown value: long strings cut with a digest, long lists and
    objects cut to their first items with a count of the rest."""
    if isinstance(value, str):
        if len(value) <= _TRIM_OVER:
            return value
        return f"{value[:_KEEP_CHARS]}…sha256:{_digest_text(value)} ({len(value):,} chars)"
    if isinstance(value, list):
        items = [_trim(v, depth + 1) for v in value[:_KEEP_ITEMS]]
        if len(value) > _KEEP_ITEMS:
            items.append(f"… {len(value) - _KEEP_ITEMS:,} more items")
        return items
    if isinstance(value, dict):
        kept: dict[str, Any] = {}
        for i, (k, v) in enumerate(value.items()):
            if i == _KEEP_ITEMS:
                kept[_OMITTED_KEY] = f"{len(value) - _KEEP_ITEMS:,} more keys"
                break
            kept[_trim(k)] = _trim(v, depth + 1)
        return kept
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**_TRIM_OVER:
        return f"an integer of {len(str(abs(value))):,} digits"
    return value


def bounded_request(body: Mapping[str, Any], sources: Mapping[str, Source]) -> dict[str, Any]:
    """The body as the task record keeps it, a few KB at most.

    Known fields are kept as sent (they are already bounded by validation), except inline
    images, kept as a short digest. Unknown keys are kept, trimmed: a long string to its first
    characters and a digest, a long list or object to its first items; once they fill
    RECORD_UNKNOWN_BYTES of JSON, the rest are counted under the key "…" instead of kept.
    """
    kept: dict[str, Any] = {}
    room = RECORD_UNKNOWN_BYTES
    omitted = 0
    for key, value in body.items():
        if key in KNOWN_FIELDS:
            kept[key] = sources[key].recorded() if key in sources else value
            continue
        if omitted:
            omitted += 1
            continue
        small_key, small = _trim(key), _trim(value)
        size = len(json.dumps({small_key: small}, ensure_ascii=False)) - 1
        if size > room or small_key in kept:
            omitted += 1
            continue
        kept[small_key] = small
        room -= size
    if omitted:
        kept[_OMITTED_KEY] = (
            f"{omitted:,} more unknown keys not kept (a task record keeps "
            f"{RECORD_UNKNOWN_BYTES:,} bytes of them)"
        )
    return kept
