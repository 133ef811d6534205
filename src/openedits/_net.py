"""Safe outbound HTTP for every URL a client gives: scheme and address rules, pinning, caps."""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from functools import cache
from ssl import SSLContext

import httpx

from openedits.errors import FetchFailed, FetchRefused, ImageTooLarge, describe_value
from openedits.settings import Settings

__all__ = ["NetPolicy", "Resolver", "check_url", "safe_request", "system_resolve"]

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
"""Maps (host, port) to the IP address strings it resolves to; the seam tests replace."""

_SCHEMES = ("http", "https")
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
_BODY_HEADERS = frozenset({"content-length", "content-type", "transfer-encoding"})
_ALLOW_HINT = (
    "only public addresses are fetched (set OPENEDITS_ALLOW_PRIVATE_URLS=true for development)"
)
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_SHARED_NAT = ipaddress.ip_network("100.64.0.0/10")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPAT = ipaddress.ip_network("::/96")

# getaddrinfo cannot be given a timeout, so it runs on a small pool and we stop waiting for it
# at the deadline; the pool is created lazily, so importing this module starts no thread.
_resolver_pool: ThreadPoolExecutor | None = None


def system_resolve(host: str, port: int) -> list[str]:
    """Resolve `host` with the system resolver (getaddrinfo): every address, first-seen order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]), None)
    return list(seen)


@dataclass(frozen=True)
class NetPolicy:
    """What openedits may fetch or call: address rule, time, bytes and redirects."""

    allow_private: bool = False
    timeout: float = 20.0
    max_bytes: int = 20_000_000
    max_redirects: int = 3
    resolve: Resolver = field(default=system_resolve, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> NetPolicy:
        """The policy the operator configured through `OPENEDITS_*` settings."""
        return cls(
            allow_private=settings.allow_private_urls,
            timeout=settings.fetch_timeout_seconds,
            max_bytes=settings.max_image_bytes,
            max_redirects=settings.max_redirects,
        )


@dataclass(frozen=True)
class _Target:
    """One parsed, resolved URL: where to connect, and what to tell the server and TLS."""

    url: httpx.URL
    host: str  # ASCII (IDNA) host as written, without brackets
    address: str  # the checked IP the connection goes to


def _why_not_public(ip: IPAddress) -> str | None:
    """Why `ip` is not a globally routable address, as a noun phrase; None when it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        # Forms that carry an IPv4 address are judged by that address: ::ffff:127.0.0.1 reaches
        # loopback on a dual-stack socket, and 6to4/NAT64 gateways forward to the embedded one.
        embedded: ipaddress.IPv4Address | None = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and (ip in _NAT64 or ip in _NAT64_LOCAL):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is None and ip in _IPV4_COMPAT and int(ip) > 1:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = _why_not_public(embedded)
            if inner is not None:
                return f"an IPv6 form of {embedded}, {inner}"
            if ip.ipv4_mapped is not None:
                return None
    if ip in _METADATA:
        return "the cloud metadata address (link-local)"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip in _THIS_NETWORK):
        return "an unspecified address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "a site-local address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED_NAT:
        return "a shared (carrier-grade NAT) address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "a non-globally-routable address"
    return None


def _parse(url: str, *, what: str) -> httpx.URL:
    """Parse a client URL and apply the scheme rule; `what` names it in messages."""
    if not isinstance(url, str) or not url.strip():
        raise FetchRefused(
            f"{what} is empty; give an http(s) URL such as https://example.com/a.png"
        )
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise FetchRefused(
            f"{what} is not a valid URL ({exc}); give an http(s) URL such as "
            "https://example.com/a.png"
        ) from None
    scheme = parsed.scheme.lower()
    if scheme not in _SCHEMES:
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        raise FetchRefused(f"{what} has {shown}; only http and https URLs are fetched")
    if not parsed.raw_host:
        raise FetchRefused(f"{what} has no host; give a full URL such as https://example.com/a.png")
    return parsed


def _literal_address(host: str) -> IPAddress | None:
    """The address a host spells directly, in any spelling the C library accepts, else None.

    inet_aton reads the legacy forms (2130706433, 0x7f.1, 0177.0.0.1, 127.1) the same way
    getaddrinfo would, so such hosts are judged without ever asking a resolver.
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _resolve(host: str, port: int, *, what: str, policy: NetPolicy, deadline: float) -> list[str]:
    """Resolve once, within the deadline; the answer is what gets checked and connected to."""
    global _resolver_pool
    literal = _literal_address(host)
    if literal is not None:
        return [str(literal)]
    if _resolver_pool is None:
        _resolver_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="openedits-resolve")
    future = _resolver_pool.submit(policy.resolve, host, port)
    try:
        addresses = list(future.result(timeout=max(0.0, deadline - time.monotonic())))
    except FutureTimeout:
        raise FetchFailed(
            f"{what} has a host {host!r} that did not resolve within {policy.timeout:g}s"
        ) from None
    except (OSError, UnicodeError, ValueError) as exc:
        raise FetchFailed(
            f"{what} has a host {host!r} that does not resolve ({exc}); check the URL"
        ) from None
    if not addresses:
        raise FetchFailed(f"{what} has a host {host!r} that resolves to no address; check the URL")
    return addresses


def _check_addresses(addresses: Sequence[str], *, what: str, policy: NetPolicy) -> str:
    """Refuse when ANY address is not public (unless allowed); return the one to connect to."""
    parsed: list[IPAddress] = []
    for text in addresses:
        try:
            # A scope (fe80::1%eth0) is only ever link-local; judge the address without it.
            parsed.append(ipaddress.ip_address(text.split("%", 1)[0]))
        except ValueError:
            raise FetchFailed(f"{what} resolves to {text!r}, which is not an IP address") from None
    if not policy.allow_private:
        for ip in parsed:
            reason = _why_not_public(ip)
            if reason is not None:
                raise FetchRefused(f"{what} resolves to {ip}, {reason}; {_ALLOW_HINT}")
    return str(parsed[0])


def _target(url: str, *, what: str, policy: NetPolicy, deadline: float) -> _Target:
    parsed = _parse(url, what=what)
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = _resolve(host, port, what=what, policy=policy, deadline=deadline)
    address = _check_addresses(addresses, what=what, policy=policy)
    return _Target(url=parsed, host=host, address=address)


def check_url(url: str, *, field: str, policy: NetPolicy) -> None:
    """Refuse (FetchRefused, 400) a URL openedits would not fetch or call.

    Non-http(s) schemes are always refused; unless `policy.allow_private`, so is a host that
    resolves to any address that is not globally routable. Used at submit time for
    `callback_url`; `safe_request` checks again (and pins the address) when it connects.
    """
    what = f"{field} {describe_value(url)}"
    if policy.allow_private:
        _parse(url, what=what)
        return
    _target(url, what=what, policy=policy, deadline=time.monotonic() + policy.timeout)


@cache
def _ssl_context() -> SSLContext:
    # Built once: loading the CA bundle costs more than the rest of a small request.
    return httpx.create_ssl_context()


def _redirect_method(method: str, status: int) -> str:
    """The method of the next hop, as browsers (and httpx) do it."""
    if status == 303 and method != "HEAD":
        return "GET"
    if status in (301, 302) and method == "POST":
        return "GET"
    return method


def _read_capped(
    response: httpx.Response, *, what: str, policy: NetPolicy, deadline: float
) -> bytes:
    """Read the body, refusing more than max_bytes and stopping at the deadline."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise ImageTooLarge(
            f"{what} is {int(declared)} bytes, over the limit of {policy.max_bytes} "
            "(OPENEDITS_MAX_IMAGE_BYTES); send a smaller file"
        )
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > policy.max_bytes:
            raise ImageTooLarge(
                f"{what} is larger than the limit of {policy.max_bytes} bytes "
                "(OPENEDITS_MAX_IMAGE_BYTES); send a smaller file"
            )
        chunks.append(chunk)
        # The read timeout bounds each wait; this bounds the sum, so a server that drips
        # a byte at a time cannot hold a worker for longer than the policy allows.
        if time.monotonic() > deadline:
            raise FetchFailed(f"{what} did not finish answering within {policy.timeout:g}s")
    return b"".join(chunks)


def _read_prefix(response: httpx.Response, limit: int, *, deadline: float) -> bytes:
    """Read at most `limit` bytes of the body (never more than one chunk past it), then stop.

    The prefix is only informative (a failure's log line), so a body that breaks off or stalls
    yields what came so far instead of an error: the status already said what happened."""
    if limit <= 0:
        return b""
    chunks: list[bytes] = []
    total = 0
    try:
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            total += len(chunk)
            if total >= limit or time.monotonic() > deadline:
                break
    except (httpx.HTTPError, OSError):
        pass
    return b"".join(chunks)[:limit]


def safe_request(
    method: str,
    url: str,
    *,
    field: str,
    policy: NetPolicy,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    follow_redirects: bool = True,
    transport: httpx.BaseTransport | None = None,
    keep_body: Callable[[int], int] | None = None,
) -> httpx.Response:
    """Make one request to a client-given URL under `policy`, and return it with its body read.

    The host is resolved once and every address checked; the connection goes to that very
    address (Host header and TLS SNI/certificate check keep the name), so DNS rebinding cannot
    swap it. Redirects are followed by hand, at most `policy.max_redirects`, each hop checked the
    same way. Connect and read waits and the whole exchange are capped by `policy.timeout` (a
    server dripping bytes may overrun it by at most one read wait); bodies over
    `policy.max_bytes` raise ImageTooLarge. Other failures raise FetchRefused or FetchFailed,
    naming `field` and the URL. The returned response's `url` is the last URL as written (not
    the pinned address), and its body is already decoded (no content-encoding header).

    `keep_body`, when given, maps the answer's status to how many body bytes to read at most
    (0: none); the rest is never read, and a long body is then no error. Callers that only
    need the status (callbacks) use it so a receiver's body costs neither time nor memory.
    """
    deadline = time.monotonic() + policy.timeout
    origin = f"{field} {describe_value(url)}"
    what = origin
    current = url
    send_headers = dict(headers or {})
    # Ask for the body as stored: counting decoded bytes still caps memory, but asking for no
    # compression keeps a gzip bomb from inflating a whole chunk before the count sees it.
    send_headers.setdefault("Accept-Encoding", "identity")
    body = content
    hops = 0
    with httpx.Client(
        transport=transport, verify=_ssl_context(), trust_env=False, follow_redirects=False
    ) as client:
        while True:
            target = _target(current, what=what, policy=policy, deadline=deadline)
            response = _send_pinned(
                client,
                method,
                target,
                content=body,
                headers=send_headers,
                what=what,
                policy=policy,
                deadline=deadline,
                keep_body=keep_body,
            )
            location = response.headers.get("location")
            if not (follow_redirects and response.status_code in _REDIRECT_CODES and location):
                return response
            hops += 1
            if hops > policy.max_redirects:
                raise FetchRefused(
                    f"{origin} redirected more than {policy.max_redirects} times; at most "
                    f"{policy.max_redirects} redirects are followed, so give the final URL"
                )
            try:
                current = str(target.url.join(location))
            except (httpx.InvalidURL, ValueError, TypeError):
                raise FetchFailed(
                    f"{what} redirected to {describe_value(location)}, which is not a valid URL"
                ) from None
            what = f"{origin} redirected to {describe_value(current)}, which"
            dropped: set[str] = set()
            if httpx.URL(current).netloc != target.url.netloc:
                dropped |= _CREDENTIAL_HEADERS  # never hand credentials to another host
            next_method = _redirect_method(method, response.status_code)
            if next_method != method:
                body = None
                dropped |= _BODY_HEADERS
                method = next_method
            send_headers = {k: v for k, v in send_headers.items() if k.lower() not in dropped}


def _send_pinned(
    client: httpx.Client,
    method: str,
    target: _Target,
    *,
    content: bytes | None,
    headers: Mapping[str, str],
    what: str,
    policy: NetPolicy,
    deadline: float,
    keep_body: Callable[[int], int] | None = None,
) -> httpx.Response:
    """Send one hop to the checked address and read its body (unless it is a redirect)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchFailed(f"{what} did not answer within {policy.timeout:g}s")
    hop_headers = {k: v for k, v in headers.items() if k.lower() != "host"}
    hop_headers["Host"] = target.url.netloc.decode("ascii")
    extensions: dict[str, object] = {}
    if target.url.scheme == "https" and _literal_address(target.host) is None:
        # Connecting to an IP would otherwise send no SNI and check the certificate against
        # the IP; this keeps both on the name the client gave.
        extensions["sni_hostname"] = target.host
    try:
        request = client.build_request(
            method,
            target.url.copy_with(host=target.address),
            content=content,
            headers=hop_headers,
            timeout=httpx.Timeout(remaining),
            extensions=extensions,
        )
        response = client.send(request, stream=True)
    except httpx.TimeoutException:
        raise FetchFailed(f"{what} did not answer within {policy.timeout:g}s") from None
    except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
        raise FetchFailed(f"{what} could not be fetched: {_describe_exc(exc)}") from None
    try:
        if response.status_code in _REDIRECT_CODES:
            data = b""  # a redirect's body is never used; don't spend time or memory on it
        elif keep_body is not None:
            data = _read_prefix(response, keep_body(response.status_code), deadline=deadline)
        else:
            data = _read_capped(response, what=what, policy=policy, deadline=deadline)
    except httpx.TimeoutException:
        raise FetchFailed(f"{what} did not finish answering within {policy.timeout:g}s") from None
    except (httpx.HTTPError, OSError) as exc:
        raise FetchFailed(f"{what} broke off while answering: {_describe_exc(exc)}") from None
    finally:
        response.close()
    kept = [
        (k, v)
        for k, v in response.headers.multi_items()
        if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(
        response.status_code,
        headers=kept,
        content=data,
        request=httpx.Request(method, target.url, headers=hop_headers),
        extensions={"openedits_address": target.address},
    )


def _describe_exc(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{text} ({type(exc).__name__})"
