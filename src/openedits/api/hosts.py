"""Which `Host` header values the server answers to: result URLs are built from it.

With OPENEDITS_PUBLIC_URL unset, a result's URL (in the reply, the task record and the signed
callback) is the request's own base URL, so a client that sends `Host: attacker.example` would
have the server hand out, and sign, links to the attacker's host. This middleware refuses a
request whose Host is not trusted with `400 bad_request` naming the value and what is allowed.

Trusted: the bind host, `localhost`, `127.0.0.1`, `[::1]`, OPENEDITS_PUBLIC_URL's host, and what
OPENEDITS_ALLOWED_HOSTS adds (comma-separated names, `*.example.com` for a domain's subdomains,
or `*` for any, behind a proxy that checks Host itself). Ports are not compared. Liveness and
readiness probes are answered whatever their Host: they form no URL, and orchestrators send
the pod's address.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from openedits.errors import InvalidInput, describe_value
from openedits.records import envelope
from openedits.settings import Settings

__all__ = ["PROBE_PATHS", "AllowedHosts", "AllowedHostsMiddleware", "host_name"]

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_LOOPBACK = ("localhost", "127.0.0.1", "::1")
_WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})


def host_name(value: str) -> str:
    """The name in a Host value, lower-cased, without port, brackets or a trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        name = value[1:].partition("]")[0]
    else:
        name = value.rpartition(":")[0] if value.count(":") == 1 else value
    return name.rstrip(".")


class AllowedHosts:
    """The set of trusted Host names, exact and by domain suffix."""

    def __init__(self, settings: Settings) -> None:
        names: set[str] = set(_LOOPBACK)
        if settings.host not in _WILDCARD_BINDS:
            names.add(host_name(settings.host) or settings.host.lower())
        if settings.public_url:
            public = urlsplit(settings.public_url).hostname
            if public:
                names.add(public.lower())
        self.any = False
        self.suffixes: list[str] = []
        for entry in (e.strip() for e in settings.allowed_hosts.split(",")):
            if entry == "*":
                self.any = True
            elif entry.startswith("*."):
                self.suffixes.append(entry[1:].lower())
            elif entry:
                names.add(host_name(entry))
        self.names = frozenset(names)

    def allows(self, host: str) -> bool:
        """Whether a Host header value is trusted."""
        if self.any:
            return True
        name = host_name(host)
        return name in self.names or any(name.endswith(s) for s in self.suffixes)

    def describe(self) -> str:
        """The trusted names, for a message."""
        shown = sorted(self.names) + [f"*{s}" for s in self.suffixes]
        return ", ".join(f"[{n}]" if ":" in n else n for n in shown)


class AllowedHostsMiddleware:
    """Refuse requests whose Host header is not trusted (400, the contract's envelope)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.hosts = AllowedHosts(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.hosts.any or scope.get("path") in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        host = next((v for k, v in scope.get("headers", []) if k == b"host"), None)
        if host is None or self.hosts.allows(host.decode("latin-1")):
            await self.app(scope, receive, send)
            return
        error = InvalidInput(
            f"Host: got {describe_value(host.decode('latin-1'), 60)}; this server answers to "
            f"{self.hosts.describe()}. Result links are built from the Host, so others are "
            "refused; the operator can add a name to OPENEDITS_ALLOWED_HOSTS or set "
            "OPENEDITS_PUBLIC_URL"
        )
        trace_id = str(scope.get("state", {}).get("trace_id", ""))
        body = json.dumps(envelope(error.code, error.message, trace_id)).encode()
        await send({
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
        })
        await send({"type": "http.response.body", "body": body})
