"""Who the caller is: the reading of a trusted proxy's X-Forwarded-* headers (`forwarded.py`) and
the rate-limit key made of an address (`ratelimit.caller_key`), then both through the app."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pwachat.forwarded import ForwardedHeaders, parse_ip
from pwachat.ratelimit import caller_key

TRUSTED = ("10.0.0.0/8", "2001:db8:ffff::/48")


def forwarded(
    headers: list[tuple[bytes, bytes]],
    peer: str | None = "10.0.0.5",
    scheme: str = "http",
    kind: str = "http",
    trusted: tuple[str, ...] = TRUSTED,
) -> dict[str, Any]:
    """The scope the app behind `ForwardedHeaders` sees for a request with these headers."""
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(scope)

    scope = {"type": kind, "scheme": scheme, "headers": headers, "client": (peer, 40000) if peer else None}
    asyncio.run(ForwardedHeaders(app, trusted)(scope, None, None))
    return seen


def xff(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", v.encode()) for v in values]


def proto(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-proto", v.encode()) for v in values]


# --------------------------------------------------------------------------------------------
# Parsing one X-Forwarded-For entry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "ip"),
    [
        ("198.51.100.7", "198.51.100.7"),
        (" 198.51.100.7 ", "198.51.100.7"),
        ("198.51.100.7:5678", "198.51.100.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("[::ffff:198.51.100.7]:80", "198.51.100.7"),
        ("::ffff:c633:6407", "198.51.100.7"),
    ],
)
def test_entry_is_read_as_an_ip(entry: str, ip: str) -> None:
    parsed = parse_ip(entry)
    assert parsed is not None and str(parsed) == ip


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "unknown",
        "_hidden",  # RFC 7239 obfuscated identifier
        "evil.example",
        "198.51.100",
        "198.51.100.256",
        "198.51.100.7:",
        "198.51.100.7:http",
        "198.51.100.7:1:2",
        "[198.51.100.7]",
        "[2001:db8::1",
        "[2001:db8::1]443",
        "[2001:db8::1]:",
        "2001:db8::1::2",
        "ip:198.51.100.7",
        "198.51.100.7 203.0.113.9",
        "1" * 500,
    ],
)
def test_entry_that_is_no_ip_is_none(entry: str) -> None:
    assert parse_ip(entry) is None


# --------------------------------------------------------------------------------------------
# ForwardedHeaders: only from a trusted peer
# --------------------------------------------------------------------------------------------


def test_proto_alone_from_trusted_peer_sets_the_scheme() -> None:
    scope = forwarded(proto("https"))
    assert scope["scheme"] == "https"
    assert scope["client"] == ("10.0.0.5", 40000)  # no X-Forwarded-For: the peer stays the client


@pytest.mark.parametrize(
    ("values", "scheme"),
    [
        (("HTTPS",), "https"),
        (("Http",), "http"),
        (("http, https",), "https"),
        (("https,http",), "http"),
        (("http", "https"), "https"),
        (("https", "http"), "http"),
        (("https", "http, HTTPS"), "https"),
        (("ftp",), "http"),  # only http/https are believed; the socket's scheme stays
        (("https, ftp",), "http"),  # the right-most value counts, and it is no scheme
        (("wss",), "http"),
        (("https ; x",), "http"),
    ],
)
def test_right_most_forwarded_proto_counts(values: tuple[str, ...], scheme: str) -> None:
    assert forwarded(proto(*values))["scheme"] == scheme


def test_proto_can_say_http_to_an_https_socket() -> None:
    assert forwarded(proto("http"), scheme="https")["scheme"] == "http"


def test_websocket_scheme_follows_the_proto() -> None:
    assert forwarded(proto("https"), scheme="ws", kind="websocket")["scheme"] == "wss"


@pytest.mark.parametrize("peer", ["203.0.113.9", "testclient", "", None])
def test_untrusted_peer_changes_nothing(peer: str | None) -> None:
    headers = [*proto("https"), *xff("198.51.100.7")]
    scope = forwarded(headers, peer=peer)
    assert scope["scheme"] == "http"
    assert scope["client"] == ((peer, 40000) if peer else None)


@pytest.mark.parametrize("peer", ["10.200.0.1", "::ffff:10.0.0.5", "2001:db8:ffff:1::7"])
def test_trusted_peer_in_any_network_and_form(peer: str) -> None:
    scope = forwarded([*proto("https"), *xff("198.51.100.7")], peer=peer)
    assert (scope["scheme"], scope["client"][0]) == ("https", "198.51.100.7")


def test_without_trusted_proxies_nothing_is_trusted() -> None:
    scope = forwarded([*proto("https"), *xff("198.51.100.7")], trusted=())
    assert (scope["scheme"], scope["client"]) == ("http", ("10.0.0.5", 40000))


def test_lifespan_passes_through() -> None:
    scope = forwarded([], kind="lifespan")
    assert scope["type"] == "lifespan"


# --------------------------------------------------------------------------------------------
# ForwardedHeaders: which X-Forwarded-For entry is the client
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "client"),
    [
        (("198.51.100.7",), "198.51.100.7"),
        # The right-most entry that is not itself a trusted proxy; what is left of it was
        # written by the client and proves nothing.
        (("203.0.113.66, 198.51.100.7",), "198.51.100.7"),
        (("203.0.113.66, 198.51.100.7, 10.1.1.1, 10.2.2.2",), "198.51.100.7"),
        (("198.51.100.7,10.1.1.1",), "198.51.100.7"),
        # Several header lines are one list, in order.
        (("203.0.113.66", "198.51.100.7"), "198.51.100.7"),
        (("198.51.100.7", "10.1.1.1"), "198.51.100.7"),
        (("203.0.113.66, 198.51.100.7", "10.1.1.1"), "198.51.100.7"),
        # Entries that are no IP are skipped: the next one to the left is used.
        (("198.51.100.7, garbage",), "198.51.100.7"),
        (("198.51.100.7, unknown, 10.1.1.1",), "198.51.100.7"),
        (("198.51.100.7, ,",), "198.51.100.7"),
        (("198.51.100.7", "<script>"), "198.51.100.7"),
        # Ports and brackets are stripped, IPv4-mapped IPv6 is IPv4, IPv6 is written canonically.
        (("198.51.100.7:5678",), "198.51.100.7"),
        (("[2001:db8::1]:443",), "2001:db8::1"),
        (("[2001:DB8:0::1]",), "2001:db8::1"),
        (("::ffff:198.51.100.7",), "198.51.100.7"),
        (("198.51.100.7, ::ffff:10.1.1.1",), "198.51.100.7"),  # a mapped trusted proxy is trusted
        (("198.51.100.7, [2001:db8:ffff::9]:80",), "198.51.100.7"),
        # Every entry a trusted proxy: the left-most is where the request came from.
        (("10.3.3.3, 10.1.1.1",), "10.3.3.3"),
    ],
)
def test_forwarded_for_names_the_client(values: tuple[str, ...], client: str) -> None:
    assert forwarded(xff(*values))["client"][0] == client


@pytest.mark.parametrize("values", [("garbage",), ("unknown, , evil.example",), ("",), ("1" * 300,)])
def test_forwarded_for_without_any_ip_leaves_the_peer(values: tuple[str, ...]) -> None:
    assert forwarded(xff(*values))["client"] == ("10.0.0.5", 40000)


def test_forwarded_for_and_proto_are_read_together() -> None:
    headers = [(b"host", b"x"), *xff("203.0.113.66"), *proto("http"), *xff("198.51.100.7"), *proto("https")]
    scope = forwarded(headers)
    assert (scope["scheme"], scope["client"][0]) == ("https", "198.51.100.7")


# --------------------------------------------------------------------------------------------
# caller_key: the rate-limit key
# --------------------------------------------------------------------------------------------


def test_ipv4_is_keyed_by_its_address() -> None:
    assert caller_key("198.51.100.7", None) == "ip:198.51.100.7"
    assert caller_key("198.51.100.7", None) != caller_key("198.51.100.8", None)


@pytest.mark.parametrize("mapped", ["::ffff:198.51.100.7", "::FFFF:198.51.100.7", "::ffff:c633:6407"])
def test_ipv4_mapped_ipv6_is_keyed_as_ipv4(mapped: str) -> None:
    assert caller_key(mapped, None) == caller_key("198.51.100.7", None) == "ip:198.51.100.7"


def test_ipv6_is_keyed_by_its_64() -> None:
    one = caller_key("2001:db8:1:2::1", None)
    assert one == caller_key("2001:db8:1:2:ffff:ffff:ffff:ffff", None)
    assert one == caller_key("2001:DB8:1:2:0:0:0:99", None)
    assert one != caller_key("2001:db8:1:3::1", None)
    assert one.startswith("ip:") and "2001:db8:1:2::" in one


def test_token_is_keyed_by_its_digest_whatever_the_address() -> None:
    key = caller_key("198.51.100.7", "alpha")
    assert key.startswith("t:") and "alpha" not in key
    assert key == caller_key("2001:db8::1", "alpha") != caller_key("198.51.100.7", "beta")


def test_peer_that_is_no_ip_keeps_its_own_key() -> None:
    # TestClient's peer, a unix socket's: not an address, still one caller.
    assert caller_key("testclient", None) == "ip:testclient"
    assert caller_key("unknown", None) != caller_key("testclient", None)


# --------------------------------------------------------------------------------------------
# Through the app (TestClient; conftest's PeerShim sets the socket peer)
# --------------------------------------------------------------------------------------------


def chat(client, **headers: str) -> int:
    return client.post("/api/chat", json={"message": "hi"}, headers=headers).status_code


def test_garbage_forwarded_for_entries_are_skipped(make_client) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="2", TRUSTED_PROXIES="10.0.0.0/8", peer="10.0.0.5")
    # One caller, however much junk a client or proxy puts around its address.
    assert chat(client, **{"X-Forwarded-For": "198.51.100.1"}) == 200
    assert chat(client, **{"X-Forwarded-For": "198.51.100.1, not-an-ip"}) == 200
    assert chat(client, **{"X-Forwarded-For": "198.51.100.1:4711, unknown"}) == 429
    # Nothing usable at all: the proxy itself is the caller (one quota for all such requests).
    assert [chat(client, **{"X-Forwarded-For": f"junk-{i}"}) for i in range(3)] == [200, 200, 429]


def test_spoofed_left_entries_do_not_make_new_callers(make_client) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="2", TRUSTED_PROXIES="10.0.0.0/8", peer="10.0.0.5")
    statuses = [chat(client, **{"X-Forwarded-For": f"203.0.113.{i}, 198.51.100.1"}) for i in range(3)]
    assert statuses == [200, 200, 429]


def test_untrusted_peers_forwarded_for_changes_nothing(make_client) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="2", TRUSTED_PROXIES="10.0.0.0/8", peer="203.0.113.7")
    statuses = [chat(client, **{"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(3)]
    assert statuses == [200, 200, 429]


def test_two_forwarded_ipv6_in_one_64_share_the_limit(make_client) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="2", TRUSTED_PROXIES="10.0.0.0/8", peer="10.0.0.5")
    assert chat(client, **{"X-Forwarded-For": "2001:db8:1:2::1"}) == 200
    assert chat(client, **{"X-Forwarded-For": "[2001:db8:1:2::1]:443"}) == 200
    assert chat(client, **{"X-Forwarded-For": "2001:db8:1:2:aaaa::77"}) == 429
    assert chat(client, **{"X-Forwarded-For": "2001:db8:1:3::1"}) == 200  # the next /64 is another caller


class Peer:
    """A socket peer the test can change between requests of one app (one limiter)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def install(self, app: Any) -> None:
        inner = app.asgi_handler

        async def set_peer(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                scope["client"] = (self.address, 40000)
            await inner(scope, receive, send)

        app.asgi_handler = set_peer


def test_two_ipv6_peers_in_one_64_share_the_limit(make_client) -> None:
    peer = Peer("2001:db8:1:2::1")
    client = make_client(RATELIMIT_PER_MINUTE="2", setup=peer.install)
    assert chat(client) == 200
    peer.address = "2001:db8:1:2::2"
    assert chat(client) == 200
    peer.address = "2001:db8:1:2:ffff:ffff:ffff:ffff"
    assert chat(client) == 429
    assert client.get("/api/rate-limit").json()["remaining"]["per_minute"] == 0
    peer.address = "2001:db8:1:3::1"  # the next /64 is another caller
    assert chat(client) == 200


def test_ipv4_mapped_peer_shares_the_ipv4_quota(make_client) -> None:
    peer = Peer("198.51.100.4")
    client = make_client(RATELIMIT_PER_MINUTE="2", setup=peer.install)
    assert chat(client) == 200
    peer.address = "::ffff:198.51.100.4"
    assert chat(client) == 200
    assert chat(client) == 429
    peer.address = "198.51.100.4"
    assert chat(client) == 429
    peer.address = "198.51.100.5"
    assert chat(client) == 200


def test_ipv4_mapped_forwarded_for_shares_the_ipv4_quota(make_client) -> None:
    client = make_client(RATELIMIT_PER_MINUTE="2", TRUSTED_PROXIES="10.0.0.0/8", peer="::ffff:10.0.0.5")
    assert chat(client, **{"X-Forwarded-For": "198.51.100.4"}) == 200
    assert chat(client, **{"X-Forwarded-For": "::ffff:198.51.100.4"}) == 200
    assert chat(client, **{"X-Forwarded-For": "[::ffff:198.51.100.4]:80"}) == 429
    # Another caller: the mapped peer is a trusted proxy, so its X-Forwarded-For counts.
    assert chat(client, **{"X-Forwarded-For": "198.51.100.5"}) == 200
