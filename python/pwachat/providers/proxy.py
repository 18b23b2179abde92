"""Egress proxies: which proxy, if any, a provider's base URL is reached through.

`HTTPS_PROXY` serves https base URLs (an HTTP CONNECT tunnel, then TLS to the origin through it),
`HTTP_PROXY` http ones (absolute-form requests, `POST http://host/path HTTP/1.1`, to the proxy);
`NO_PROXY` names the hosts reached directly. The settings read them once, lower-case spellings
winning over upper-case ones as curl and Python's `urllib` do (pwachat/settings.py); this module
decides per base URL, once, when a provider's pool is made (`http_client.Pool`).

`NO_PROXY` is matched as httpx and the official SDKs do: a comma-separated list whose entries are
`*` (no proxy at all), a domain (`example.com` and `.example.com` both match it and its
subdomains; `*.example.com` too), an IP address or a CIDR block (`10.0.0.0/8`, `::1`), each with
an optional `:port` that must then match too. Case does not matter.

A proxy is an `http://` URL (`https://` proxies, TLS to the proxy itself, are not supported and
are refused at start-up; a URL without a scheme is read as `http://`, as curl does; the port
defaults to 80). Credentials in it (`http://user:pass@proxy:3128`) are sent as
`Proxy-Authorization: Basic ...` to the proxy only, never forwarded to the provider, never logged,
and never part of an error message (which say only the proxy's host and port).
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

__all__ = ["Proxy", "ascii_host", "no_proxy_matches", "parse_proxy_url", "proxy_for"]


@dataclass(frozen=True, repr=False)
class Proxy:
    """Where to send a pool's connections, and what to say to the proxy."""

    host: str
    port: int
    #: The `Proxy-Authorization` header's value, or None without credentials.
    authorization: str | None = None

    @property
    def where(self) -> str:
        """host:port, for messages: the credentials are never part of it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __repr__(self) -> str:
        return f"Proxy({self.where})"


def parse_proxy_url(text: str) -> Proxy:
    """The proxy of a `*_PROXY` value; ValueError (whose message never quotes the value) if unusable."""
    text = text.strip()
    if "://" not in text:
        text = "http://" + text
    url = urlsplit(text)
    if url.scheme.lower() != "http":
        raise ValueError("expected an http:// proxy URL (TLS to the proxy is not supported)")
    try:
        port = url.port or 80
    except ValueError:
        raise ValueError("the proxy URL's port is not a number from 1 to 65535") from None
    if not url.hostname:
        raise ValueError("the proxy URL has no host")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError("a proxy URL is scheme, host and port only")
    authorization = None
    if url.username is not None or url.password is not None:
        user = unquote(url.username or "")
        password = unquote(url.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        authorization = f"Basic {token}"
    return Proxy(ascii_host(url.hostname), port, authorization)


def ascii_host(host: str) -> str:
    """The host as it goes into DNS, SNI and `Host`: ASCII as it is, an IDN as its A-label."""
    try:
        return host.encode("ascii").decode()
    except UnicodeEncodeError:
        try:
            return host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("the host name cannot be encoded (IDNA)") from None


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [v6] or [v6]:port
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    else:  # a name, an IPv4 address, or a bare IPv6 address (which has several colons)
        host, port = entry, ""
    return host, int(port) if port.isascii() and port.isdigit() else None


def no_proxy_matches(no_proxy: str, host: str, port: int) -> bool:
    """Whether `host:port` is to be reached directly under that NO_PROXY value."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        name, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if "/" in name:
            try:
                network = ipaddress.ip_network(name, strict=False)
            except ValueError:
                continue
            if address is not None and address.version == network.version and address in network:
                return True
            continue
        try:
            entry_address = ipaddress.ip_address(name)
        except ValueError:
            entry_address = None
        if entry_address is not None:  # an IP entry matches that IP only
            if address == entry_address:
                return True
            continue
        domain = name.removeprefix("*").lstrip(".").rstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def proxy_for(
    base_url: str, *, https_proxy: str | None, http_proxy: str | None, no_proxy: str
) -> Proxy | None:
    """The proxy a base URL goes through, or None to connect directly."""
    url = urlsplit(base_url)
    chosen = https_proxy if url.scheme == "https" else http_proxy if url.scheme == "http" else None
    if not chosen or not url.hostname:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    if no_proxy and no_proxy_matches(no_proxy, url.hostname, port):
        return None
    return parse_proxy_url(chosen)
