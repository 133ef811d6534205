"""Safe outbound HTTP: hostile URLs, pinning, redirects, time and byte caps, on real servers."""

from __future__ import annotations

import contextlib
import gzip
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openedits._net import NetPolicy, check_url, safe_request
from openedits.errors import FetchFailed, FetchRefused, ImageTooLarge, OpenEditsError
from openedits.settings import Settings

Route = Callable[["_Handler"], None]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _dispatch(self) -> None:
        web = self.server.web
        web.seen.append((self.command, self.path, self.headers.get("Host", "")))
        route = web.routes.get(self.path.split("?")[0])
        if route is None:
            reply(self, 404, b"not here")
        else:
            route(self)

    do_GET = do_POST = do_HEAD = _dispatch

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    web: Web

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up mid-body are what several tests do on purpose


class Web:
    """A threaded HTTP server on 127.0.0.1 with per-path handlers and a log of requests."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[tuple[str, str, str]] = []
        self.stop = threading.Event()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.web = self
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def reply(h: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    h.send_response(status)
    named = {name.replace("_", "-"): value for name, value in headers.items()}
    named.setdefault("Content-Length", str(len(body)))
    for name, value in named.items():
        h.send_header(name, value)
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


@pytest.fixture
def web() -> Iterator[Web]:
    server = Web()
    yield server
    server.close()


def resolver_to(mapping: dict[str, Sequence[str]], calls: list[str] | None = None):  # type: ignore[no-untyped-def]
    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in mapping:
            raise OSError(f"unknown test host {host}")
        return list(mapping[host])

    return resolve


def no_transport() -> tuple[httpx.MockTransport, list[httpx.Request]]:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, content=b"should never be reached")

    return httpx.MockTransport(handler), sent


STRICT = NetPolicy(timeout=5.0)
LAX = NetPolicy(allow_private=True, timeout=5.0)

HOSTILE: list[tuple[str, type[Exception], str]] = [
    ("file:///etc/passwd", FetchRefused, "scheme 'file'; only http and https"),
    ("ftp://example.com/a.png", FetchRefused, "scheme 'ftp'"),
    ("gopher://127.0.0.1:70/_GET", FetchRefused, "scheme 'gopher'"),
    ("dict://127.0.0.1:11211/stats", FetchRefused, "scheme 'dict'"),
    ("javascript:alert(1)", FetchRefused, "scheme 'javascript'"),
    ("data:image/png;base64,AAAA", FetchRefused, "scheme 'data'"),
    ("//example.com/a.png", FetchRefused, "no scheme"),
    ("http:///a.png", FetchRefused, "has no host"),
    ("http://[::1", FetchRefused, "not a valid URL"),
    ("", FetchRefused, "is empty"),
    ("http://127.0.0.1/x.png", FetchRefused, "resolves to 127.0.0.1, a loopback address"),
    ("HTTP://127.0.0.1:8080/x.png", FetchRefused, "127.0.0.1, a loopback address"),
    ("http://user:pw@127.0.0.1/", FetchRefused, "127.0.0.1, a loopback address"),
    ("http://127.255.255.254/", FetchRefused, "a loopback address"),
    ("http://localhost/", FetchRefused, "a loopback address"),
    ("http://[::1]/", FetchRefused, "::1, a loopback address"),
    ("http://0.0.0.0/", FetchRefused, "0.0.0.0, an unspecified address"),
    ("http://0/", FetchRefused, "0.0.0.0, an unspecified address"),
    ("http://[::]/", FetchRefused, "an unspecified address"),
    ("http://10.0.0.1/", FetchRefused, "10.0.0.1, a private address"),
    ("http://172.16.0.1/", FetchRefused, "172.16.0.1, a private address"),
    ("http://172.31.255.255/", FetchRefused, "a private address"),
    ("http://192.168.1.1/", FetchRefused, "192.168.1.1, a private address"),
    ("http://169.254.169.254/latest/meta-data/", FetchRefused, "the cloud metadata address"),
    ("http://169.254.1.1/", FetchRefused, "a link-local address"),
    ("http://100.64.0.1/", FetchRefused, "carrier-grade NAT"),
    ("http://224.0.0.1/", FetchRefused, "a multicast address"),
    ("http://239.255.255.250:1900/", FetchRefused, "a multicast address"),
    ("http://240.0.0.1/", FetchRefused, "a reserved address"),
    ("http://255.255.255.255/", FetchRefused, "a reserved address"),
    ("http://[::ffff:127.0.0.1]/", FetchRefused, "an IPv6 form of 127.0.0.1, a loopback"),
    ("http://[::ffff:7f00:1]/", FetchRefused, "an IPv6 form of 127.0.0.1, a loopback"),
    ("http://[::ffff:169.254.169.254]/", FetchRefused, "cloud metadata"),
    ("http://[::127.0.0.1]/", FetchRefused, "an IPv6 form of 127.0.0.1, a loopback"),
    ("http://[2002:7f00:1::]/", FetchRefused, "an IPv6 form of 127.0.0.1, a loopback"),
    ("http://[2002:a00:1::1]/", FetchRefused, "an IPv6 form of 10.0.0.1, a private"),
    ("http://[64:ff9b::a9fe:a9fe]/", FetchRefused, "an IPv6 form of 169.254.169.254"),
    ("http://[64:ff9b::7f00:1]/", FetchRefused, "an IPv6 form of 127.0.0.1"),
    ("http://[fe80::1]/", FetchRefused, "a link-local address"),
    ("http://[fc00::1]/", FetchRefused, "a private address"),
    ("http://[fd00:ec2::254]/", FetchRefused, "the cloud metadata address"),
    ("http://[fec0::1]/", FetchRefused, "a site-local address"),
    ("http://[ff02::1]/", FetchRefused, "a multicast address"),
    ("http://[2001:db8::1]/", FetchRefused, "a private address"),
    ("http://2130706433/", FetchRefused, "127.0.0.1, a loopback address"),
    ("http://0x7f000001/", FetchRefused, "127.0.0.1, a loopback address"),
    ("http://0x7f.1/", FetchRefused, "127.0.0.1, a loopback address"),
    ("http://127.1/", FetchRefused, "127.0.0.1, a loopback address"),
    ("http://0177.0.0.1/", FetchRefused, "not a valid URL"),  # httpx refuses it itself
    ("http://017700000001/", FetchRefused, "127.0.0.1, a loopback address"),
    ("http://0xa9.0xfe.0xa9.0xfe/", FetchRefused, "the cloud metadata address"),
    ("http://3232235777/", FetchRefused, "192.168.1.1, a private address"),
]


@pytest.mark.parametrize(("url", "error", "needle"), HOSTILE)
def test_hostile_urls_are_refused_fast_without_connecting(
    url: str, error: type[Exception], needle: str
) -> None:
    transport, sent = no_transport()
    started = time.monotonic()
    with pytest.raises(error) as caught:
        safe_request("GET", url, field="image_url", policy=STRICT, transport=transport)
    with pytest.raises(error):
        check_url(url, field="callback_url", policy=STRICT)
    assert time.monotonic() - started < 1.0
    assert sent == []
    message = str(caught.value)
    assert message.startswith("image_url ")
    assert needle in message


def test_refusal_message_teaches() -> None:
    with pytest.raises(FetchRefused) as caught:
        safe_request("GET", "http://127.0.0.1/x.png", field="image_url", policy=STRICT)
    assert str(caught.value) == (
        "image_url 'http://127.0.0.1/x.png' resolves to 127.0.0.1, a loopback address; only "
        "public addresses are fetched (set OPENEDITS_ALLOW_PRIVATE_URLS=true for development)"
    )


def test_long_values_are_trimmed_in_messages() -> None:
    url = "gopher://" + "a" * 5000
    with pytest.raises(FetchRefused) as caught:
        check_url(url, field="callback_url", policy=STRICT)
    assert len(str(caught.value)) < 200


def test_any_private_address_among_several_refuses() -> None:
    policy = NetPolicy(resolve=resolver_to({"mixed.test": ["93.184.216.34", "10.1.2.3"]}))
    transport, sent = no_transport()
    with pytest.raises(FetchRefused, match=r"resolves to 10\.1\.2\.3, a private address"):
        safe_request(
            "GET", "http://mixed.test/", field="image_url", policy=policy, transport=transport
        )
    assert sent == []


def test_allow_private_lifts_the_address_rule_but_not_the_scheme(web: Web) -> None:
    web.routes["/a"] = lambda h: reply(h, 200, b"hello")
    response = safe_request("GET", web.url("/a"), field="image_url", policy=LAX)
    assert response.status_code == 200
    assert response.content == b"hello"
    check_url(web.url("/a"), field="callback_url", policy=LAX)
    for url in ("file:///etc/passwd", "gopher://127.0.0.1/", "ftp://127.0.0.1/"):
        with pytest.raises(FetchRefused, match="only http and https"):
            safe_request("GET", url, field="image_url", policy=LAX)
        with pytest.raises(FetchRefused, match="only http and https"):
            check_url(url, field="callback_url", policy=LAX)


def test_name_is_resolved_once_and_the_checked_address_is_the_one_connected(web: Web) -> None:
    web.routes["/a"] = lambda h: reply(h, 200, b"pinned")
    calls: list[str] = []
    resolve = resolver_to({"example.test": ["127.0.0.1"]}, calls)
    url = web.url("/a", host="example.test")

    with pytest.raises(
        FetchRefused, match=r"'http://example\.test:\d+/a' resolves to 127\.0\.0\.1"
    ):
        safe_request("GET", url, field="image_url", policy=NetPolicy(resolve=resolve))
    assert web.seen == []

    calls.clear()
    policy = NetPolicy(allow_private=True, resolve=resolve)
    response = safe_request("GET", url, field="image_url", policy=policy)
    assert response.content == b"pinned"
    assert calls == ["example.test"]  # once: nothing can re-resolve to another address later
    assert web.seen == [("GET", "/a", f"example.test:{web.port}")]
    assert str(response.url) == url  # the URL as written, not the pinned address
    assert response.extensions["openedits_address"] == "127.0.0.1"


def test_rebinding_resolver_cannot_swap_the_address(web: Web) -> None:
    web.routes["/a"] = lambda h: reply(h, 200, b"ok")
    answers = iter([["127.0.0.1"], ["10.9.9.9"]])
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    policy = NetPolicy(allow_private=True, resolve=rebinding)
    response = safe_request(
        "GET", web.url("/a", host="rebind.test"), field="image_url", policy=policy
    )
    assert response.content == b"ok"
    assert calls == ["rebind.test"]


def test_redirects_are_followed_and_each_hop_checked(web: Web) -> None:
    web.routes["/img"] = lambda h: reply(h, 200, b"final")
    web.routes["/r1"] = lambda h: reply(h, 302, Location="/r2")
    web.routes["/r2"] = lambda h: reply(h, 301, Location=web.url("/r3"))
    web.routes["/r3"] = lambda h: reply(h, 307, Location="/img")
    web.routes["/r0"] = lambda h: reply(h, 308, Location="/r1")
    response = safe_request("GET", web.url("/r1"), field="image_url", policy=LAX)
    assert response.content == b"final"
    assert response.url.path == "/img"

    started = time.monotonic()
    with pytest.raises(FetchRefused, match="redirected more than 3 times"):
        safe_request("GET", web.url("/r0"), field="image_url", policy=LAX)
    assert time.monotonic() - started < 2.0
    with pytest.raises(FetchRefused, match="redirected more than 0 times"):
        safe_request(
            "GET",
            web.url("/r3"),
            field="image_url",
            policy=NetPolicy(allow_private=True, max_redirects=0),
        )


def test_redirect_not_followed_when_asked(web: Web) -> None:
    web.routes["/r"] = lambda h: reply(h, 302, Location="http://169.254.169.254/")
    response = safe_request(
        "POST",
        web.url("/r"),
        field="callback_url",
        policy=LAX,
        content=b"{}",
        follow_redirects=False,
    )
    assert response.status_code == 302
    assert response.headers["location"] == "http://169.254.169.254/"


@pytest.mark.parametrize(
    ("location", "needle"),
    [
        ("http://127.0.0.1:{port}/", "which resolves to 127.0.0.1, a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "the cloud metadata address"),
        ("http://internal.test/", "which resolves to 10.0.0.5, a private address"),
        ("http://[::ffff:10.0.0.1]/", "an IPv6 form of 10.0.0.1"),
        ("http://2130706433/", "127.0.0.1, a loopback address"),
        ("file:///etc/passwd", "which has scheme 'file'"),
    ],
)
def test_redirect_from_public_to_private_is_refused_before_connecting(
    web: Web, location: str, needle: str
) -> None:
    sent: list[httpx.Request] = []

    def public_server(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(302, headers={"Location": location.format(port=web.port)})

    resolve = resolver_to({"public.test": ["93.184.216.34"], "internal.test": ["10.0.0.5"]})
    with pytest.raises(FetchRefused) as caught:
        safe_request(
            "GET",
            "http://public.test/a.png",
            field="image_url",
            policy=NetPolicy(resolve=resolve),
            transport=httpx.MockTransport(public_server),
        )
    assert needle in str(caught.value)
    assert str(caught.value).startswith("image_url 'http://public.test/a.png' redirected to ")
    # The one request made went to the checked address, naming the host it was given.
    assert [(r.url.host, r.headers["host"]) for r in sent] == [("93.184.216.34", "public.test")]
    assert web.seen == []


def test_see_other_turns_post_into_get(web: Web) -> None:
    web.routes["/form"] = lambda h: reply(h, 303, Location="/done")
    web.routes["/done"] = lambda h: reply(h, 200, h.command.encode())
    response = safe_request(
        "POST",
        web.url("/form"),
        field="callback_url",
        policy=LAX,
        content=b"x",
        headers={"Content-Type": "text/plain"},
    )
    assert response.content == b"GET"


def _drip(h: BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "100000")
    h.end_headers()
    web: Web = h.server.web  # type: ignore[attr-defined]
    try:
        while not web.stop.wait(0.05):
            h.wfile.write(b"x")
            h.wfile.flush()
    except OSError:
        pass


def _stall(h: BaseHTTPRequestHandler) -> None:
    h.server.web.stop.wait(10)  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["/drip", "/stall"])
def test_slow_servers_fail_within_the_timeout(web: Web, path: str) -> None:
    web.routes["/drip"] = _drip
    web.routes["/stall"] = _stall
    policy = NetPolicy(allow_private=True, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(FetchFailed, match=r"within 1s"):
        safe_request("GET", web.url(path), field="image_url", policy=policy)
    assert time.monotonic() - started < 2.5


def test_slow_resolver_fails_within_the_timeout() -> None:
    release = threading.Event()

    def slow(host: str, port: int) -> list[str]:
        release.wait(5)
        return ["93.184.216.34"]

    started = time.monotonic()
    with pytest.raises(FetchFailed, match=r"did not resolve within 0\.5s"):
        check_url(
            "http://slow.test/", field="callback_url", policy=NetPolicy(timeout=0.5, resolve=slow)
        )
    assert time.monotonic() - started < 1.5
    release.set()


def test_unresolvable_host_fails() -> None:
    with pytest.raises(FetchFailed, match=r"'nowhere\.test' that does not resolve"):
        check_url(
            "http://nowhere.test/", field="callback_url", policy=NetPolicy(resolve=resolver_to({}))
        )


def _huge(h: BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Connection", "close")
    h.end_headers()
    chunk = b"\0" * 65536
    try:
        for _ in range(1600):  # 100 MiB if nobody stops reading
            h.wfile.write(chunk)
    except OSError:
        pass


def test_huge_bodies_are_capped(web: Web) -> None:
    web.routes["/huge"] = _huge
    web.routes["/declared"] = lambda h: reply(h, 200, b"", Content_Length="30000000")
    bomb = gzip.compress(b"\0" * 5_000_000)
    web.routes["/gzip"] = lambda h: reply(h, 200, bomb, Content_Encoding="gzip")
    policy = NetPolicy(allow_private=True, max_bytes=1_000_000, timeout=5.0)
    for path, needle in [
        ("/huge", "larger than the limit of 1000000 bytes"),
        ("/declared", "is 30000000 bytes, over the limit of 1000000"),
        ("/gzip", "larger than the limit of 1000000 bytes"),
    ]:
        started = time.monotonic()
        with pytest.raises(ImageTooLarge) as caught:
            safe_request("GET", web.url(path), field="image_url", policy=policy)
        assert needle in str(caught.value)
        assert "OPENEDITS_MAX_IMAGE_BYTES" in str(caught.value)
        assert time.monotonic() - started < 2.0
    ok = safe_request(
        "GET",
        web.url("/gzip"),
        field="image_url",
        policy=NetPolicy(allow_private=True, max_bytes=6_000_000),
    )
    assert ok.content == b"\0" * 5_000_000
    assert "content-encoding" not in ok.headers


def test_connection_refused_is_a_fetch_failure() -> None:
    web = Web()
    url = web.url("/gone")
    web.close()
    with pytest.raises(FetchFailed, match="could not be fetched"):
        safe_request("GET", url, field="mask", policy=LAX)


def test_http_errors_are_returned_not_raised(web: Web) -> None:
    web.routes["/gone"] = lambda h: reply(h, 410, b"gone", Retry_After="7")
    response = safe_request(
        "POST",
        web.url("/gone"),
        field="callback_url",
        policy=LAX,
        content=b"{}",
        follow_redirects=False,
    )
    assert response.status_code == 410
    assert response.headers["retry-after"] == "7"


def test_policy_from_settings() -> None:
    settings = Settings(
        allow_private_urls=True, fetch_timeout_seconds=7, max_redirects=5, max_image_bytes=1234
    )
    policy = NetPolicy.from_settings(settings)
    assert (policy.allow_private, policy.timeout, policy.max_redirects, policy.max_bytes) == (
        True,
        7.0,
        5,
        1234,
    )
    assert NetPolicy.from_settings(Settings()) == NetPolicy()


# --- https: the connection goes to the pinned IP but SNI and the certificate check use the name


def _make_cert(tmp: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName=DNS:{name}",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_keeps_sni_and_certificate_check_on_the_name(tmp_path: Path) -> None:
    cert, key = _make_cert(tmp_path, "example.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    sni_seen: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: sni_seen.append(name)  # type: ignore[assignment,misc,return-value]
    web = Web(ssl_context=server_ctx)
    try:
        web.routes["/a"] = lambda h: reply(h, 200, b"secure")
        client_ctx = ssl.create_default_context(cafile=str(cert))
        resolve = resolver_to({"example.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
        policy = NetPolicy(allow_private=True, resolve=resolve)
        response = safe_request(
            "GET",
            web.url("/a", host="example.test", scheme="https"),
            field="image_url",
            policy=policy,
            transport=httpx.HTTPTransport(verify=client_ctx),
        )
        assert response.content == b"secure"
        assert sni_seen[-1] == "example.test"
        with pytest.raises(FetchFailed, match="could not be fetched"):
            safe_request(
                "GET",
                web.url("/a", host="other.test", scheme="https"),
                field="image_url",
                policy=policy,
                transport=httpx.HTTPTransport(verify=client_ctx),
            )
    finally:
        web.close()


# --- hypothesis: whatever the URL text, only openedits errors come out, and nothing connects

_URL_PARTS = st.sampled_from(
    [
        "http://",
        "https://",
        "HTTP://",
        "ftp://",
        "//",
        "[",
        "]",
        "::",
        ":",
        "@",
        "%",
        "%25",
        "#",
        "?",
        "/",
        ".",
        "0x7f",
        "127",
        "1",
        "0",
        "ffff",
        "example.test",
        "xn--",
        "ü",
        " ",
        "\n",
        "\x00",
        "\\",
        "localhost",
        "[::ffff:",
        "169.254.169.254",
        ":65536",
        ":0",
        ":-1",
    ]
)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(_URL_PARTS, max_size=10).map("".join)))
def test_arbitrary_url_text_only_raises_openedits_errors(url: str) -> None:
    transport, sent = no_transport()
    policy = NetPolicy(timeout=2.0, resolve=resolver_to({"example.test": ["93.184.216.34"]}))
    for call in (
        lambda: check_url(url, field="callback_url", policy=policy),
        lambda: safe_request("GET", url, field="image_url", policy=policy, transport=transport),
    ):
        with contextlib.suppress(OpenEditsError):
            call()
    assert all(r.url.host == "93.184.216.34" for r in sent)


def test_credentials_not_forwarded_to_another_host(web: Web) -> None:
    web.routes["/start"] = lambda h: reply(h, 302, Location=web.url("/end", host="other.test"))
    web.routes["/end"] = lambda h: reply(h, 200, (h.headers.get("Authorization") or "-").encode())
    resolve = resolver_to({"one.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    response = safe_request(
        "GET",
        web.url("/start", host="one.test"),
        field="image_url",
        policy=NetPolicy(allow_private=True, resolve=resolve),
        headers={"Authorization": "Bearer secret"},
    )
    assert response.content == b"-"
    assert [host for _, _, host in web.seen] == [f"one.test:{web.port}", f"other.test:{web.port}"]
