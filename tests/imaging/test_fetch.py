"""Fetcher: URLs through the safe client, data: URIs, bare base64, sizes and teaching messages."""

from __future__ import annotations

import base64
import time

import pytest
from PIL import Image

from openedits._net import NetPolicy
from openedits.errors import (
    FetchFailed,
    FetchRefused,
    ImageInvalid,
    ImageTooLarge,
    InvalidInput,
)
from openedits.imaging.decode import decode_image
from openedits.imaging.fetch import Fetcher
from tests.imaging.conftest import encode, quadrants
from tests.test_net import Web, reply

LAX = NetPolicy(allow_private=True, timeout=5.0)
PNG = encode(quadrants())


def test_url_fetch_ignores_content_type_and_the_decoder_sniffs(web: Web) -> None:
    web.routes["/photo"] = lambda h: reply(h, 200, PNG, Content_Type="text/plain")
    web.routes["/html"] = lambda h: reply(h, 200, b"<html>login</html>", Content_Type="image/png")
    fetcher = Fetcher(LAX)
    data = fetcher.fetch(web.url("/photo"), field="image_url")
    assert data == PNG
    assert decode_image(data, max_pixels=10**6, max_side=2048).format == "PNG"
    html = fetcher.fetch(web.url("/html"), field="image_url")
    with pytest.raises(ImageInvalid, match="look like HTML"):
        decode_image(html, max_pixels=10**6, max_side=2048)


def test_private_url_refused_without_allow_private(web: Web) -> None:
    web.routes["/x.png"] = lambda h: reply(h, 200, PNG)
    with pytest.raises(FetchRefused) as caught:
        Fetcher(NetPolicy()).fetch("http://127.0.0.1/x.png", field="image_url")
    assert str(caught.value) == (
        "image_url 'http://127.0.0.1/x.png' resolves to 127.0.0.1, a loopback address; only "
        "public addresses are fetched (set OPENEDITS_ALLOW_PRIVATE_URLS=true for development)"
    )
    with pytest.raises(FetchRefused, match=r"^mask 'http://127\.0\.0\.1:\d+/x\.png' resolves"):
        Fetcher(NetPolicy()).fetch(web.url("/x.png"), field="mask", allow_bare_base64=True)
    assert web.seen == []


def test_http_error_status_and_empty_body(web: Web) -> None:
    web.routes["/empty"] = lambda h: reply(h, 200, b"")
    fetcher = Fetcher(LAX)
    with pytest.raises(FetchFailed, match="answered HTTP 404; give a URL that serves the image"):
        fetcher.fetch(web.url("/missing.png"), field="image_url")
    with pytest.raises(ImageInvalid, match="answered with an empty body"):
        fetcher.fetch(web.url("/empty"), field="image_url")


def test_url_bodies_are_capped(web: Web) -> None:
    web.routes["/big"] = lambda h: reply(h, 200, b"\x89PNG" + b"\0" * 5000)
    with pytest.raises(ImageTooLarge, match="over the limit of 1000"):
        Fetcher(NetPolicy(allow_private=True, max_bytes=1000)).fetch(
            web.url("/big"), field="image_url"
        )


def test_data_uri() -> None:
    fetcher = Fetcher(NetPolicy())
    text = base64.b64encode(PNG).decode()
    assert fetcher.fetch(f"data:image/png;base64,{text}", field="image_url") == PNG
    # Declared type is a claim only; line breaks, URL-safe alphabet and lost padding are fine.
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    assert fetcher.fetch(f"DATA:image/jpeg;base64,{wrapped}", field="image_url") == PNG
    urlsafe = base64.urlsafe_b64encode(PNG).decode().rstrip("=")
    assert fetcher.fetch(f"data:image/png;base64,{urlsafe}", field="image_url") == PNG


@pytest.mark.parametrize(
    ("source", "error", "needle"),
    [
        ("data:image/png,abcd", ImageInvalid, "without ;base64"),
        ("data:image/png;base64", ImageInvalid, "without a comma"),
        ("data:image/png;base64,@@@@", ImageInvalid, "is not valid base64"),
        ("data:image/png;base64,A", ImageInvalid, "is not valid base64"),
        ("data:image/png;base64,", ImageInvalid, "holds no bytes"),
        ("   ", InvalidInput, "image_url is empty"),
        ("iVBORw0KGgo=", InvalidInput, "is not a URL; give an http(s) URL or a data:"),
        ("/etc/passwd", InvalidInput, "is not a URL"),
        ("file:///etc/passwd", FetchRefused, "scheme 'file'"),
        ("javascript:alert(1)", FetchRefused, "scheme 'javascript'"),
    ],
)
def test_bad_sources_teach(source: str, error: type[Exception], needle: str) -> None:
    with pytest.raises(error) as caught:
        Fetcher(NetPolicy()).fetch(source, field="image_url")
    assert needle in str(caught.value)
    assert str(caught.value).startswith("image_url")


def test_data_uri_size_checked_before_decoding() -> None:
    fetcher = Fetcher(NetPolicy(max_bytes=1000))
    huge = "data:image/png;base64," + "A" * 4_000_000
    started = time.monotonic()
    with pytest.raises(ImageTooLarge, match="over the limit of 1000"):
        fetcher.fetch(huge, field="image_url")
    assert time.monotonic() - started < 0.5
    exact = base64.b64encode(b"x" * 1000).decode()
    assert fetcher.fetch(f"data:image/png;base64,{exact}", field="image_url") == b"x" * 1000
    over = base64.b64encode(b"x" * 1001).decode()
    with pytest.raises(ImageTooLarge):
        fetcher.fetch(f"data:image/png;base64,{over}", field="image_url")


def test_bare_base64_only_for_masks() -> None:
    mask = encode(Image.new("L", (8, 8), 255))
    text = base64.b64encode(mask).decode()
    fetcher = Fetcher(NetPolicy())
    assert fetcher.fetch(text, field="mask", allow_bare_base64=True) == mask
    assert fetcher.fetch(f"data:image/png;base64,{text}", field="mask") == mask
    with pytest.raises(InvalidInput, match=r"mask '.* is not a URL"):
        fetcher.fetch(text, field="mask")
    with pytest.raises(ImageInvalid, match=r"mask '.* is not valid base64"):
        fetcher.fetch("not base64 at all!", field="mask", allow_bare_base64=True)


def test_non_string_source() -> None:
    with pytest.raises(InvalidInput, match="image_url must be a string, not int"):
        Fetcher(NetPolicy()).fetch(42, field="image_url")  # type: ignore[arg-type]
