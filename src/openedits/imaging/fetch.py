"""Getting client image bytes: http(s) URLs through the safe fetcher, data: URIs and base64."""

from __future__ import annotations

import base64
import binascii
import re

import httpx

from openedits._net import NetPolicy, safe_request
from openedits.errors import FetchFailed, ImageInvalid, ImageTooLarge, InvalidInput, describe_value

__all__ = ["Fetcher"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_WHITESPACE = re.compile(rb"\s+")
_ACCEPT = "image/png, image/jpeg, image/webp, image/*;q=0.8, */*;q=0.5"


class Fetcher:
    """Turns an `image_url` or `mask` value into raw bytes, under one NetPolicy."""

    def __init__(self, policy: NetPolicy, *, transport: httpx.BaseTransport | None = None) -> None:
        self.policy = policy
        self._transport = transport

    def fetch(self, source: str, *, field: str, allow_bare_base64: bool = False) -> bytes:
        """The raw bytes `source` stands for, at most `policy.max_bytes` of them.

        `source` is an http(s) URL, a `data:image/...;base64,` URI, or (when
        `allow_bare_base64`, as for `mask`) bare base64. Raises FetchRefused, FetchFailed,
        ImageInvalid or ImageTooLarge with a message naming the field, the trimmed value and
        what is allowed. The bytes are not decoded here: their type is sniffed by the decoder.
        """
        if not isinstance(source, str):
            raise InvalidInput(f"{field} must be a string, not {type(source).__name__}")
        text = source.strip()
        allowed = "an http(s) URL or a data:image/...;base64, URI"
        if allow_bare_base64:
            allowed = "an http(s) URL, a data:image/...;base64, URI or bare base64"
        if not text:
            raise InvalidInput(f"{field} is empty; give {allowed}")
        if text[:5].lower() == "data:":
            return self._data_uri(text, field=field)
        if _SCHEME.match(text):
            return self._url(text, field=field)
        if allow_bare_base64:
            return self._base64(text, field=field, shown=describe_value(source))
        raise InvalidInput(f"{field} {describe_value(source)} is not a URL; give {allowed}")

    def _url(self, url: str, *, field: str) -> bytes:
        response = safe_request(
            "GET",
            url,
            field=field,
            policy=self.policy,
            headers={"Accept": _ACCEPT},
            transport=self._transport,
        )
        if not 200 <= response.status_code < 300:
            raise FetchFailed(
                f"{field} {describe_value(url)} answered HTTP {response.status_code}; give a URL "
                "that serves the image itself to anyone (no login, no expired signature)"
            )
        if not response.content:
            raise ImageInvalid(f"{field} {describe_value(url)} answered with an empty body")
        return response.content

    def _data_uri(self, uri: str, *, field: str) -> bytes:
        shown = describe_value(uri)
        header, comma, payload = uri.partition(",")
        if not comma:
            raise ImageInvalid(
                f"{field} {shown} is a data: URI without a comma; use data:image/png;base64,<data>"
            )
        params = [p.strip().lower() for p in header[5:].split(";")]
        if "base64" not in params[1:]:
            raise ImageInvalid(
                f"{field} {shown} is a data: URI without ;base64; use data:image/png;base64,<data>"
            )
        # The declared media type is not checked: like a URL's content-type, it is a claim, and
        # the decoder sniffs the real type from the bytes.
        return self._base64(payload, field=field, shown=shown)

    def _base64(self, text: str, *, field: str, shown: str) -> bytes:
        raw = _WHITESPACE.sub(b"", text.encode("ascii", "replace"))
        # Checked before decoding: 4 characters of base64 carry 3 bytes.
        if len(raw) // 4 * 3 > self.policy.max_bytes + 2:
            raise ImageTooLarge(
                f"{field} is about {len(raw) // 4 * 3} bytes, over the limit of "
                f"{self.policy.max_bytes} (OPENEDITS_MAX_IMAGE_BYTES); send a smaller file"
            )
        # Accept the URL-safe alphabet and missing padding: both are common and unambiguous.
        raw = raw.replace(b"-", b"+").replace(b"_", b"/").rstrip(b"=")
        raw += b"=" * (-len(raw) % 4)
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise ImageInvalid(
                f"{field} {shown} is not valid base64; send the file's bytes base64-encoded"
            ) from None
        if not data:
            raise ImageInvalid(f"{field} {shown} holds no bytes")
        if len(data) > self.policy.max_bytes:
            raise ImageTooLarge(
                f"{field} is {len(data)} bytes, over the limit of {self.policy.max_bytes} "
                "(OPENEDITS_MAX_IMAGE_BYTES); send a smaller file"
            )
        return data
