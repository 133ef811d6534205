"""Hostile URLs and bodies through the real HTTP app: each gets its 4xx envelope, fast.

Every case names the field it attacks; the reply (a synchronous call) or the task (an async one)
must fail with a 4xx-class error whose message names that field, within a few seconds, and never
with a 500 or a hang. Addresses are judged with private URLs *refused* (the production default);
public URLs are served by an in-process transport so nothing leaves the machine, and the cases
that need a real socket (a slow server, a huge streamed body) use a loopback server.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from openedits.api.app import create_app
from openedits.runtime import Runtime
from openedits.settings import Settings
from tests.conftest import AUTH, TESTCLIENT_HOST, TOKEN, data_uri, png_bytes
from tests.engines.contract import make_test_image, make_test_mask
from tests.fakes import FakeEngine
from tests.test_net import Web, reply

PUBLIC = "93.184.216.34"  # globally routable; answered by the in-process transport below
FAST = 5.0  # seconds a hostile request may take, start to 4xx
FETCH_TIMEOUT = 1.0
MAX_IMAGE_BYTES = 300_000
MAX_BODY_BYTES = 2_000_000

IMAGE = make_test_image((96, 64))
IMAGE_URI = data_uri(IMAGE)
MASK_PNG = png_bytes(make_test_mask((96, 64)))


# --- hostile bytes, built in code


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _png(width: int, height: int, idat: bytes, colour_type: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def _zero_bomb(side: int) -> bytes:
    """A real decompression bomb: side x side grey zeros, a few hundred KB compressed."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [packer.compress(row) for _ in range(side)]
    return _png(side, side, b"".join(parts) + packer.flush())


HEADER_BOMB = _png(65_535, 65_535, zlib.compress(b"\x00" * 100))  # 4.3 Gpx, claimed
ZERO_BOMB = _zero_bomb(8_000)  # 64 Mpx of zeros (over the 40 Mpx limit), ~65 KB on the wire
TRUNCATED = png_bytes(IMAGE)[: len(png_bytes(IMAGE)) // 2]
NOT_IMAGES = {
    "html": b"<html><body>not an image</body></html>",
    "pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n",
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
    "zeros": b"\x00" * 256,
}
BLACK_MASK = png_bytes(Image.new("L", (96, 64), 0))
WHITE_MASK = png_bytes(Image.new("L", (96, 64), 255))
OPAQUE_ALPHA_MASK = png_bytes(Image.new("RGBA", (96, 64), (0, 0, 0, 255)))
SMALL_MASK = png_bytes(make_test_mask((24, 16)))
BIG_BLACK_MASK = png_bytes(Image.new("L", (960, 640), 0))  # black, ten times the size


def _uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- the public web, in process: what a hostile public server can answer


def _public_web(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    redirects = {
        "/to-loopback": "http://127.0.0.1/a.png",
        "/to-localhost": "http://localhost:8000/a.png",
        "/to-metadata": "http://169.254.169.254/latest/meta-data/iam/",
        "/to-private": "http://10.0.0.5/a.png",
        "/to-decimal": "http://2130706433/a.png",
        "/to-hex": "http://0x7f000001/a.png",
        "/to-mapped": "http://[::ffff:127.0.0.1]/a.png",
        "/to-file": "file:///etc/passwd",
        "/to-gopher": "gopher://127.0.0.1:6379/_INFO",
        "/loop": "/loop",
    }
    if path in redirects:
        return httpx.Response(302, headers={"location": redirects[path]})
    if path == "/a.png":
        return httpx.Response(200, content=png_bytes(IMAGE), headers={"content-type": "image/png"})
    if path == "/html":
        return httpx.Response(200, content=NOT_IMAGES["html"],
                              headers={"content-type": "image/png"})
    if path == "/empty":
        return httpx.Response(200, content=b"")
    if path == "/bomb.png":
        return httpx.Response(200, content=ZERO_BOMB)
    if path == "/truncated.png":
        return httpx.Response(200, content=TRUNCATED)
    if path == "/huge-declared":
        return httpx.Response(200, headers={"content-length": str(10**12)}, content=b"x")
    if path == "/huge-streamed":
        return httpx.Response(200, content=(b"\x89PNG" + b"\x00" * 65_536 for _ in range(1_000)))
    if path == "/login":
        return httpx.Response(401, content=b"sign in first")
    return httpx.Response(404, content=b"not here")


# --- apps


def _settings(root: Path, *, allow_private: bool) -> Settings:
    return Settings(
        data_dir=root,
        api_tokens=TOKEN,
        allow_private_urls=allow_private,
        fetch_timeout_seconds=FETCH_TIMEOUT,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_body_bytes=MAX_BODY_BYTES,
        sync_timeout_seconds=15,
        rate_limit="off",  # these tests are about inputs, not about request counts
        allowed_hosts=TESTCLIENT_HOST,
        lease_seconds=5,
        reaper_interval_seconds=0.5,
    )


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """Private URLs refused (the default); public ones answered by `_public_web`."""
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in __import__("os").environ if k.startswith("OPENEDITS_")]:
            mp.delenv(key)
        settings = _settings(tmp_path_factory.mktemp("strict"), allow_private=False)
        rt = Runtime.build(settings, engine=FakeEngine(),
                           fetch_transport=httpx.MockTransport(_public_web))
        with TestClient(create_app(settings, runtime=rt), raise_server_exceptions=False) as tc:
            yield tc


def _stall(h: Any) -> None:
    h.server.web.stop.wait(10)


def _drip(h: Any) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "100000")
    h.end_headers()
    try:
        while not h.server.web.stop.wait(0.05):
            h.wfile.write(b"x")
            h.wfile.flush()
    except OSError:
        pass


def _endless(h: Any) -> None:
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    block = b"\x00" * 65_536
    try:
        while not h.server.web.stop.is_set():
            h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
    except OSError:
        pass


@pytest.fixture(scope="module")
def loopback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Web]]:
    """Private URLs allowed (development mode), so a real loopback server can misbehave."""
    web = Web()
    web.routes.update({
        "/stall": _stall,
        "/drip": _drip,
        "/endless": _endless,
        "/big": lambda h: reply(h, 200, b"\x00" * (MAX_IMAGE_BYTES + 1)),
        "/html": lambda h: reply(h, 200, NOT_IMAGES["html"], Content_Type="image/png"),
        "/redirect-chain": lambda h: reply(h, 302, Location="/redirect-chain"),
    })
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in __import__("os").environ if k.startswith("OPENEDITS_")]:
            mp.delenv(key)
        settings = _settings(tmp_path_factory.mktemp("loopback"), allow_private=True)
        app = create_app(settings, engine=FakeEngine())
        try:
            with TestClient(app, raise_server_exceptions=False) as tc:
                yield tc, web
        finally:
            web.close()


# --- checks


def _envelope(r: httpx.Response, field_name: str, codes: set[str]) -> dict[str, Any]:
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    body = r.json()
    assert body["success"] is False, body
    assert body["error"]["code"] in codes, body
    assert field_name in body["error"]["message"], body
    assert body["trace_id"] == r.headers["x-trace-id"]
    return body


def _timed_post(tc: TestClient, path: str, **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("headers", AUTH)
    started = time.monotonic()
    r = tc.post(path, **kwargs)
    elapsed = time.monotonic() - started
    assert elapsed < FAST, f"took {elapsed:.1f} s: {r.status_code} {r.text[:200]}"
    return r


def _wait_failed(tc: TestClient, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + FAST
    while True:
        record = tc.post("/midjourney/tasks", headers=AUTH, json={"id": task_id}).json()
        if record.get("state") in ("succeeded", "failed", "cancelled"):
            return dict(record)
        assert time.monotonic() < deadline, f"task still {record.get('state')}: {record}"
        time.sleep(0.05)


@dataclass(frozen=True)
class Case:
    """One hostile input: the body keys it sets, the field it attacks, the codes it may get."""

    id: str
    body: dict[str, Any]
    field: str
    codes: frozenset[str] = frozenset({"bad_request"})
    app: str = "strict"
    extra: dict[str, Any] = field(default_factory=dict)


def _submit_and_check(tc: TestClient, case: Case, mode: str) -> None:
    body = {"image_url": IMAGE_URI, "prompt": "a red hat", **case.body}
    if mode == "async":
        body["async"] = True
    r = _timed_post(tc, "/midjourney/edits", json=body)
    if mode == "sync" or r.status_code != 200:
        _envelope(r, case.field, set(case.codes))
        return
    record = _wait_failed(tc, r.json()["task_id"])
    assert record["state"] == "failed", record
    error = record["error"]
    assert error["code"] in case.codes, record
    assert case.field in error["message"], record


def _client(request: pytest.FixtureRequest, case: Case) -> TestClient:
    if case.app == "strict":
        tc: TestClient = request.getfixturevalue("strict")
        return tc
    tc, _web = request.getfixturevalue("loopback")
    return tc


# --- addresses: everything that is not a public address, in every spelling


NOT_PUBLIC = {
    "loopback": "http://127.0.0.1/a.png",
    "loopback-port": "http://127.0.0.1:6379/",
    "localhost": "http://localhost/a.png",
    "ipv6-loopback": "http://[::1]/a.png",
    "private-10": "http://10.0.0.1/a.png",
    "private-172": "http://172.16.5.4/a.png",
    "private-192": "http://192.168.1.1/a.png",
    "cgnat": "http://100.64.0.1/a.png",
    "link-local": "http://169.254.1.1/a.png",
    "metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "metadata-ipv6": "http://[fd00:ec2::254]/latest/meta-data/",
    "unspecified": "http://0.0.0.0/a.png",
    "unspecified-short": "http://0/a.png",
    "ipv6-unspecified": "http://[::]/a.png",
    "decimal": "http://2130706433/a.png",
    "decimal-metadata": "http://2852039166/latest/meta-data/",
    "hex": "http://0x7f000001/a.png",
    "hex-dotted": "http://0x7f.0x0.0x0.0x1/a.png",
    "octal": "http://0177.0.0.1/a.png",
    "short": "http://127.1/a.png",
    "ipv4-mapped": "http://[::ffff:127.0.0.1]/a.png",
    "ipv4-mapped-hex": "http://[::ffff:7f00:1]/a.png",
    "ipv4-mapped-metadata": "http://[::ffff:169.254.169.254]/",
    "ipv4-compatible": "http://[::127.0.0.1]/a.png",
    "6to4-loopback": "http://[2002:7f00:1::]/a.png",
    "nat64-metadata": "http://[64:ff9b::a9fe:a9fe]/",
    "ipv6-unique-local": "http://[fc00::1]/a.png",
    "ipv6-link-local": "http://[fe80::1]/a.png",
    "multicast": "http://224.0.0.1/a.png",
    "broadcast": "http://255.255.255.255/a.png",
    "userinfo-confusion": f"http://{PUBLIC}@127.0.0.1/a.png",
    "credentials": "http://admin:admin@127.0.0.1/a.png",
    "trailing-dot": "http://localhost./a.png",
    "https-loopback": "https://127.0.0.1/a.png",
}

REDIRECTS = {
    "redirect-to-loopback": "/to-loopback",
    "redirect-to-localhost": "/to-localhost",
    "redirect-to-metadata": "/to-metadata",
    "redirect-to-private": "/to-private",
    "redirect-to-decimal": "/to-decimal",
    "redirect-to-hex": "/to-hex",
    "redirect-to-mapped": "/to-mapped",
    "redirect-to-file": "/to-file",
    "redirect-to-gopher": "/to-gopher",
    "redirect-loop": "/loop",
}

PUBLIC_BODIES = {
    "html-as-png": ("/html", "bad_request"),
    "empty-body": ("/empty", "bad_request"),
    "zero-bomb": ("/bomb.png", "payload_too_large"),
    "truncated": ("/truncated.png", "bad_request"),
    "huge-declared": ("/huge-declared", "payload_too_large"),
    "huge-streamed": ("/huge-streamed", "payload_too_large"),
    "http-401": ("/login", "bad_request"),
    "http-404": ("/nope", "bad_request"),
}

SOURCE_CASES: list[Case] = []
for name, url in NOT_PUBLIC.items():
    SOURCE_CASES.append(Case(f"image_url-{name}", {"image_url": url}, "image_url"))
    SOURCE_CASES.append(Case(f"mask-url-{name}", {"mask": url}, "mask"))
for name, path in REDIRECTS.items():
    url = f"http://{PUBLIC}{path}"
    SOURCE_CASES.append(Case(f"image_url-{name}", {"image_url": url}, "image_url"))
    SOURCE_CASES.append(Case(f"mask-url-{name}", {"mask": url}, "mask"))
for name, (path, code) in PUBLIC_BODIES.items():
    url = f"http://{PUBLIC}{path}"
    codes = frozenset({code})
    SOURCE_CASES.append(Case(f"image_url-{name}", {"image_url": url}, "image_url", codes))
    SOURCE_CASES.append(Case(f"mask-url-{name}", {"mask": url}, "mask", codes))

# Loopback servers that misbehave (private URLs allowed so that they can be reached at all).
for name in ("stall", "drip", "endless", "big", "html", "redirect-chain"):
    code = "payload_too_large" if name in ("endless", "big") else "bad_request"
    for attacked in ("image_url", "mask"):
        SOURCE_CASES.append(Case(f"{attacked}-slow-or-big-{name}", {attacked: f"LOOPBACK/{name}"},
                                 attacked, frozenset({code}), app="loopback"))

INLINE = {
    "header-bomb": (HEADER_BOMB, "payload_too_large"),
    "zero-bomb": (ZERO_BOMB, "payload_too_large"),
    "truncated-png": (TRUNCATED, "bad_request"),
    **{f"not-an-image-{k}": (v, "bad_request") for k, v in NOT_IMAGES.items()},
    "over-max-bytes": (b"\x89PNG" + b"\x00" * MAX_IMAGE_BYTES, "payload_too_large"),
}
for name, (data, code) in INLINE.items():
    codes = frozenset({code})
    SOURCE_CASES.append(Case(f"image_url-data-{name}", {"image_url": _uri(data)}, "image_url",
                             codes))
    SOURCE_CASES.append(Case(f"mask-data-{name}", {"mask": _uri(data)}, "mask", codes))
    SOURCE_CASES.append(Case(f"mask-base64-{name}", {"mask": _b64(data)}, "mask", codes))

SOURCE_CASES += [
    Case("image_url-data-not-base64", {"image_url": "data:image/png,%89PNG"}, "image_url"),
    Case("image_url-data-no-comma", {"image_url": "data:image/png;base64"}, "image_url"),
    Case("image_url-data-bad-base64", {"image_url": "data:image/png;base64,!!!*"}, "image_url"),
    Case("image_url-data-empty", {"image_url": "data:image/png;base64,"}, "image_url"),
    Case("image_url-data-svg", {"image_url": _uri(b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                                  "image/svg+xml")}, "image_url"),
    Case("mask-bad-base64", {"mask": "not base64 at all!"}, "mask"),
    Case("mask-empty", {"mask": ""}, "mask"),
    Case("mask-file-scheme", {"mask": "file:///etc/passwd"}, "mask"),
    Case("mask-gopher-scheme", {"mask": "gopher://127.0.0.1:6379/_FLUSHALL"}, "mask"),
    Case("mask-selects-nothing-url-uri", {"mask": _uri(BLACK_MASK)}, "mask"),
    Case("mask-selects-nothing-base64", {"mask": _b64(BLACK_MASK)}, "mask"),
    Case("mask-selects-nothing-opaque-alpha", {"mask": _b64(OPAQUE_ALPHA_MASK)}, "mask"),
    Case("mask-selects-nothing-other-size", {"mask": _b64(BIG_BLACK_MASK)}, "mask"),
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("case", SOURCE_CASES, ids=lambda c: c.id)
def test_hostile_sources_fail_fast_naming_the_field(
    request: pytest.FixtureRequest, case: Case, mode: str
) -> None:
    tc = _client(request, case)
    if case.app == "loopback":
        _tc, web = request.getfixturevalue("loopback")
        attacked = next(iter(case.body))
        case = Case(case.id, {attacked: case.body[attacked].replace("LOOPBACK", web.url(""))},
                    case.field, case.codes, case.app)
    _submit_and_check(tc, case, mode)


# --- masks that are odd but valid: the edit goes through


@pytest.mark.timeout(20)
@pytest.mark.parametrize("mask", [
    pytest.param(_b64(WHITE_MASK), id="all-white-base64"),
    pytest.param(_uri(WHITE_MASK), id="all-white-data-uri"),
    pytest.param(_b64(SMALL_MASK), id="quarter-size"),
    pytest.param(_uri(png_bytes(make_test_mask((960, 640)))), id="ten-times-size"),
    pytest.param(f"http://{PUBLIC}/a.png", id="photo-as-mask-url"),
])
def test_odd_but_valid_masks_are_edited(strict: TestClient, mask: str) -> None:
    r = _timed_post(strict, "/midjourney/edits",
                    json={"image_url": IMAGE_URI, "prompt": "a red hat", "mask": mask})
    assert r.status_code == 200, r.text
    assert (r.json()["image_width"], r.json()["image_height"]) == (192, 128)


# --- callback_url: refused at submit time, before any task exists


CALLBACKS = {
    **{name: url.replace("/a.png", "/hook") for name, url in NOT_PUBLIC.items()},
    "file": "file:///etc/passwd",
    "gopher": "gopher://127.0.0.1:6379/_FLUSHALL",
    "javascript": "javascript:alert(1)",
    "ftp": "ftp://example.com/hook",
    "no-scheme": "example.com/hook",
    "scheme-relative": "//example.com/hook",
    "no-host": "http:///hook",
    "empty": "",
    "spaces": "   ",
    "garbage": "ht!tp://[::1",
    "nul": "http://example.com/\x00hook",
}


@pytest.mark.timeout(15)
@pytest.mark.parametrize("url", CALLBACKS.values(), ids=CALLBACKS.keys())
def test_hostile_callback_urls_are_refused_at_submit(strict: TestClient, url: str) -> None:
    before = strict.post("/midjourney/tasks", headers=AUTH,
                         json={"action": "retrieve_batch", "limit": 1}).json()["count"]
    r = _timed_post(strict, "/midjourney/edits",
                    json={"image_url": IMAGE_URI, "prompt": "x", "callback_url": url})
    _envelope(r, "callback_url", {"bad_request"})
    after = strict.post("/midjourney/tasks", headers=AUTH,
                        json={"action": "retrieve_batch", "limit": 1}).json()["count"]
    assert after == before, "a refused submit must not leave a task behind"


@pytest.mark.timeout(15)
@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://x/", "//x/a.png", "a.png",
                                 "javascript:alert(1)", "ftp://x/a.png", "", " ",
                                 "\x00http://x/a.png"])
def test_image_urls_with_other_schemes_are_refused_at_submit(strict: TestClient, url: str) -> None:
    r = _timed_post(strict, "/midjourney/edits", json={"image_url": url, "prompt": "x"})
    _envelope(r, "image_url", {"bad_request"})


# --- bodies


def _deep(depth: int, leaf: Any = 1) -> str:
    return "[" * depth + json.dumps(leaf) + "]" * depth


BODIES: dict[str, tuple[bytes, str, set[str]]] = {
    "deep-array": (b'{"image_url": "x", "prompt": "x", "extra": ' + _deep(100_000).encode() + b"}",
                   "body", {"bad_request"}),
    "deep-object": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "body", {"bad_request"}),
    "deep-prompt": (b'{"image_url": "x", "prompt": ' + _deep(900).encode() + b"}",
                    "prompt", {"bad_request"}),
    "deep-just-under-recursion": (b'{"image_url": "x", "prompt": "x", "e": '
                                  + _deep(990).encode() + b"}", "body", {"bad_request"}),
    "nan": (b'{"image_url": "x", "prompt": "x", "extra": NaN}', "NaN", {"bad_request"}),
    "infinity": (b'{"image_url": "x", "prompt": "x", "limit": -Infinity}', "Infinity",
                 {"bad_request"}),
    "huge-int-literal": (b'{"image_url": "x", "prompt": "x", "seed": ' + b"9" * 5000 + b"}",
                         "JSON", {"bad_request"}),
    "lone-surrogate-prompt": (b'{"image_url": "x", "prompt": "a\\ud800b"}', "prompt",
                              {"bad_request"}),
    "lone-surrogate-key": (b'{"image_url": "x", "prompt": "x", "\\udfff": 1}', "body",
                           {"bad_request"}),
    "nul-in-prompt": (b'{"image_url": "x", "prompt": "a\\u0000b"}', "prompt", {"bad_request"}),
    "nul-in-extra-key": (b'{"image_url": "x", "prompt": "x", "k\\u0000": 1}', "body",
                         {"bad_request"}),
    "invalid-utf8": (b'{"image_url": "x", "prompt": "\xff\xfe"}', "JSON", {"bad_request"}),
    "trailing-garbage": (b'{"image_url": "x", "prompt": "x"} {}', "JSON", {"bad_request"}),
    "array": (b"[" + b"1," * 100_000 + b"1]", "JSON object", {"bad_request"}),
    "number": (b"1e999999", "JSON object", {"bad_request"}),
    "null": (b"null", "JSON object", {"bad_request"}),
    "whitespace": (b" \n\t ", "empty", {"bad_request"}),
}


@pytest.mark.timeout(15)
@pytest.mark.parametrize("path", ["/midjourney/edits", "/midjourney/tasks"])
@pytest.mark.parametrize("name", BODIES.keys())
def test_hostile_json_bodies_are_400(strict: TestClient, name: str, path: str) -> None:
    raw, needle, codes = BODIES[name]
    r = _timed_post(strict, path, content=raw,
                    headers={**AUTH, "content-type": "application/json"})
    _envelope(r, needle, codes)


@pytest.mark.timeout(15)
def test_ten_thousand_keys_are_accepted_or_refused_fast(strict: TestClient) -> None:
    # Unknown keys are accepted by the contract, so a wide body is not an error by itself; it
    # must simply not be slow, and missing fields are still named.
    wide = {f"k{i}": i for i in range(10_000)}
    r = _timed_post(strict, "/midjourney/edits", json=wide)
    _envelope(r, "image_url", {"bad_request"})
    r = _timed_post(strict, "/midjourney/edits",
                    json={**wide, "image_url": IMAGE_URI, "prompt": "x", "async": True})
    assert r.status_code == 200, r.text
    r = _timed_post(strict, "/midjourney/tasks", json={**wide, "action": "retrieve_batch"})
    assert r.status_code == 200, r.text


@pytest.mark.timeout(15)
@pytest.mark.parametrize("chunked", [False, True])
def test_a_huge_body_is_413_without_reading_it_all(strict: TestClient, chunked: bool) -> None:
    payload = b'{"image_url": "data:image/png;base64,' + b"A" * (MAX_BODY_BYTES + 10) + b'"}'
    content: Any = iter([payload[i:i + 65_536] for i in range(0, len(payload), 65_536)]) \
        if chunked else payload
    r = _timed_post(strict, "/midjourney/edits", content=content,
                    headers={**AUTH, "content-type": "application/json"})
    _envelope(r, "body", {"payload_too_large"})


# --- prompts


PROMPTS: dict[str, tuple[str, int]] = {
    "4001-chars": ("x" * 4001, 400),
    "4000-multibyte-over": ("🎩" * 4001, 400),
    "empty": ("", 400),
    "whitespace": (" \t\n\u3000 ", 400),
    "nul": ("a red\x00hat", 400),
    "only-nul": ("\x00", 400),
    # Valid Unicode is a valid prompt, however odd it looks.
    "4000-chars": ("x" * 4000, 200),
    "emoji": ("a 🎩 on a 🐈", 200),
    "rtl-override": ("a red hat \u202egnp.exe", 200),
    "zero-width": ("a\u200bred\u200dhat", 200),
    "combining": ("e\u0301" * 100, 200),
    "control-chars": ("a\x07red\x1bhat", 200),
    "cjk": ("赤い帽子", 200),
}


@pytest.mark.timeout(15)
@pytest.mark.parametrize("name", PROMPTS.keys())
def test_prompts(strict: TestClient, name: str) -> None:
    prompt, status = PROMPTS[name]
    r = _timed_post(strict, "/midjourney/edits",
                    json={"image_url": IMAGE_URI, "prompt": prompt, "async": True})
    if status == 200:
        assert r.status_code == 200, r.text
        record = strict.post("/midjourney/tasks", headers=AUTH,
                             json={"id": r.json()["task_id"]}).json()
        assert record["request"]["prompt"] == prompt
    else:
        _envelope(r, "prompt", {"bad_request"})


# --- wrong types and values, everywhere


EDIT_FIELDS: dict[str, list[Any]] = {
    "image_url": [5, 1.5, True, [], ["http://x"], {}, {"url": "x"}],
    "prompt": [5, True, [], ["x"], {}, {"text": "x"}],
    "action": [5, True, [], {}, "upscale"],
    "mask": [5, True, [], {}, ["aGVsbG8="]],
    "mode": [5, "ULTRA", "", [], {}, "fast "],
    "split_images": ["true", 1, 0, "yes", [], {}],
    "async": ["true", 1, "no", [], {}],
    "callback_url": [5, True, [], {}, ["http://x"]],
    "seed": [-1, 2**32, 2**64, 10**30, "1", 1.5, True, [], {}],
}


@pytest.mark.timeout(15)
@pytest.mark.parametrize(("name", "value"),
                         [(k, v) for k, vs in EDIT_FIELDS.items() for v in vs],
                         ids=lambda x: repr(x)[:30])
def test_wrong_types_in_edits_name_the_field(strict: TestClient, name: str, value: Any) -> None:
    body = {"image_url": IMAGE_URI, "prompt": "x", name: value}
    r = _timed_post(strict, "/midjourney/edits", json=body)
    codes = {"api_not_implemented"} if name == "action" and value == "upscale" else {"bad_request"}
    _envelope(r, name, codes)


TASK_FIELDS: dict[str, list[Any]] = {
    "limit": [0, -1, 101, 10**30, 2**63, -(2**63) - 1, "12", 1.5, True, [], {}],
    "offset": [-1, -(2**63) - 1, "0", 1.5, False, [], {}],
    "id": [5, True, [], {}, 1.5],
    "trace_id": [5, True, [], {}],
    "ids": ["x", 5, [1], [None], {}, [[]], ["x"] * 101],
    "trace_ids": ["x", 5, [1], {}, ["x"] * 101],
    "action": [5, True, [], {}],
}


@pytest.mark.timeout(15)
@pytest.mark.parametrize("action", ["retrieve", "retrieve_batch", "cancel"])
@pytest.mark.parametrize(("name", "value"),
                         [(k, v) for k, vs in TASK_FIELDS.items() for v in vs],
                         ids=lambda x: repr(x)[:30])
def test_wrong_types_in_tasks_name_the_field(
    strict: TestClient, action: str, name: str, value: Any
) -> None:
    r = _timed_post(strict, "/midjourney/tasks", json={"action": action, "id": "x", name: value})
    _envelope(r, name, {"bad_request"})


@pytest.mark.timeout(15)
@pytest.mark.parametrize("action", ["retrieve", "retrieve_batch", "cancel"])
@pytest.mark.parametrize("offset", [10**6, 2**31, 2**53, 2**63, 2**64, 10**30, 10**300])
def test_huge_offsets_page_past_the_end(strict: TestClient, action: str, offset: int) -> None:
    # Any non-negative offset is valid; one past the end is an empty page, however large.
    r = _timed_post(strict, "/midjourney/tasks",
                    json={"action": action, "id": "x", "offset": offset, "limit": 100})
    assert r.status_code == 200, r.text
    if action == "retrieve_batch":
        assert r.json()["items"] == [] and r.json()["count"] >= 0


@pytest.mark.timeout(15)
@pytest.mark.parametrize("key", ["k" * 256, "k" * 10_000, "", " "])
def test_an_empty_or_over_long_idempotency_key_is_400(strict: TestClient, key: str) -> None:
    r = _timed_post(strict, "/midjourney/edits", json={"image_url": IMAGE_URI, "prompt": "x"},
                    headers={**AUTH, "idempotency-key": key})
    _envelope(r, "Idempotency-Key", {"bad_request"})


# --- the worker survives it all


@pytest.mark.timeout(20)
def test_the_server_still_edits_after_the_onslaught(strict: TestClient) -> None:
    r = _timed_post(strict, "/midjourney/edits", json={"image_url": IMAGE_URI, "prompt": "x",
                                                       "mask": _b64(MASK_PNG)})
    assert r.status_code == 200, r.text
    assert r.json()["success"] is True
    health = strict.get("/healthz")
    assert health.status_code == 200, health.text


@pytest.mark.timeout(15)
@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/midjourney/edits", "POST"),
    ("PUT", "/midjourney/tasks", "POST"),
    ("TRACE", "/healthz", "GET"),
    ("DELETE", "/healthz", "GET"),
])
def test_wrong_methods_say_which_method_is_allowed(
    strict: TestClient, method: str, path: str, allowed: str
) -> None:
    r = strict.request(method, path, headers=AUTH)
    assert r.status_code == 405
    body = _envelope(r, path, {"method_not_allowed"})
    assert f"use {allowed}" in body["error"]["message"]
    assert allowed in r.headers["allow"]
