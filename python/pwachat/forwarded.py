"""Who the caller is and how it connected: the socket peer, or what a trusted proxy says of it.

`ForwardedHeaders` (installed outermost in `app.py` when `TRUSTED_PROXIES` is set) believes
`X-Forwarded-Proto` and `X-Forwarded-For` from a peer in those networks only, each header on its
own: many nginx set-ups send the scheme and no addresses. `rate_limit_address` turns the address
that results into the rate limit's notion of one caller (`ratelimit.caller_key`).

Ours rather than Granian's `wrap_asgi_with_proxy_headers`, which believes X-Forwarded-Proto only
along with X-Forwarded-For (a redirect loop in production behind such an nginx), takes the first
X-Forwarded-Proto rather than the last, and makes a client of any string in X-Forwarded-For.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Iterable
from functools import lru_cache
from typing import Any

__all__ = ["ForwardedHeaders", "client_ip", "parse_ip", "rate_limit_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# "[" + the longest IPv6 text (45 characters, with an IPv4 tail) + "]:65535", with room for
# the blanks around a list item: anything longer is no address, and is not parsed (nor cached).
_MAX_ENTRY = 64
_SCHEMES = {b"http": "http", b"https": "https"}
_WS_SCHEMES = {"http": "ws", "https": "wss"}


def client_ip(scope: dict[str, Any]) -> str:
    """The caller's address: the socket peer, or behind a trusted proxy what `ForwardedHeaders`
    put in its place."""
    client = scope.get("client")
    return client[0] if client else "unknown"


def parse_ip(text: str) -> IPAddress | None:
    """One address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]`
    or `[2001:db8::1]:443`, blanks around it ignored; IPv4-mapped IPv6 (`::ffff:1.2.3.4`) is its
    IPv4 address. None for anything else (`unknown`, RFC 7239's `_hidden`, host names, junk)."""
    if len(text) > _MAX_ENTRY:
        return None
    return _parse_ip(text.strip())


@lru_cache(maxsize=4096)
def _parse_ip(text: str) -> IPAddress | None:
    try:
        if text.startswith("["):
            host, bracket, port = text[1:].partition("]")
            if not bracket or (port and not (port[0] == ":" and _is_port(port[1:]))):
                return None
            ip: IPAddress = ipaddress.IPv6Address(host)
        elif text.count(":") == 1:  # IPv4 with a port (a bare IPv6 address has two colons or more)
            host, _, port = text.partition(":")
            if not _is_port(port):
                return None
            ip = ipaddress.IPv4Address(host)
        else:
            ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit()


@lru_cache(maxsize=8192)
def rate_limit_address(address: str) -> str:
    """The part of an address that is one caller for the rate limit: an IPv4 address as it is
    (IPv4-mapped IPv6 included), an IPv6 address by its /64 (`2001:db8:1:2::/64`), which is what
    one subscriber gets and can pick addresses from at will. Anything that is no IP (TestClient's
    `testclient`, `unknown`) is its own key, unchanged.

    Cached: the common case, the same few thousand callers again and again, is one dict look-up.
    The addresses come from the server's socket or from `ForwardedHeaders`, never raw from a
    request, so the cache holds short strings only."""
    ip = parse_ip(address)
    if ip is None:
        return address
    if ip.version == 4:
        return str(ip)
    return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"


class ForwardedHeaders:
    """From a socket peer in the trusted networks only: the right-most `X-Forwarded-Proto` value,
    if it is `http` or `https` (any case), becomes `scope["scheme"]`; the right-most
    `X-Forwarded-For` entry that is an IP and not itself a trusted proxy becomes
    `scope["client"]`. Either header counts without the other.

    Several header lines are one comma list, in order. X-Forwarded-For entries that are no IP
    are skipped (the next one to the left counts); if every entry is a trusted proxy, the
    left-most is where the request came from; if none is an IP, the peer stays the client.
    An untrusted peer's headers change nothing.

    Plain ASGI, on every request of a proxied deployment: the networks are parsed once, each
    request is one pass over its headers, and what is known of an address (parsed form,
    trusted or not) is cached, so the usual request costs a few dict look-ups."""

    __slots__ = ("_v4", "_v6", "app", "classify")

    def __init__(self, app: Any, trusted_networks: Iterable[str]) -> None:
        self.app = app
        networks = [ipaddress.ip_network(n, strict=False) for n in trusted_networks]
        # (network, mask) as integers: an address is inside when `int(address) & mask == network`.
        self._v4 = tuple((int(n.network_address), int(n.netmask)) for n in networks if n.version == 4)
        self._v6 = tuple((int(n.network_address), int(n.netmask)) for n in networks if n.version == 6)
        self.classify = lru_cache(maxsize=4096)(self._classify)

    def _classify(self, text: str) -> tuple[str | None, bool]:
        """An address text as (its canonical form or None if it is no IP, whether it is trusted)."""
        ip = parse_ip(text)
        if ip is None:
            return None, False
        value = int(ip)
        for network, mask in self._v4 if ip.version == 4 else self._v6:
            if value & mask == network:
                return str(ip), True
        return str(ip), False

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
        # Returns the app's awaitable rather than awaiting it: one coroutine frame less per request.
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            peer = scope.get("client")
            if peer and len(peer[0]) <= _MAX_ENTRY and self.classify(peer[0])[1]:
                self._apply(scope, kind)
        return self.app(scope, receive, send)

    def _apply(self, scope: dict[str, Any], kind: str) -> None:
        proto = xff = None
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                xff = value if xff is None else xff + b"," + value
            elif name == b"x-forwarded-proto":
                proto = value if proto is None else proto + b"," + value
        if proto is not None:
            scheme = _SCHEMES.get(_last_item(proto).lower())
            if scheme is not None:
                scope["scheme"] = scheme if kind == "http" else _WS_SCHEMES[scheme]
        if xff is not None:
            client = self._client_of(xff)
            if client is not None:
                scope["client"] = (client, 0)

    def _client_of(self, xff: bytes) -> str | None:
        left_most = None
        for entry in reversed(xff.decode("latin-1").split(",")):
            if len(entry) > _MAX_ENTRY:
                continue
            ip, trusted = self.classify(entry)
            if ip is None:
                continue
            if not trusted:
                return ip
            left_most = ip
        return left_most


def _last_item(value: bytes) -> bytes:
    # The right-most element of an HTTP list; empty elements do not count (RFC 9110, 5.6.1).
    item = value.rpartition(b",")[2].strip()
    if item:
        return item
    for item in reversed(value.split(b",")):
        if item := item.strip():
            return item
    return b""
