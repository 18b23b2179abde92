"""Egress proxies (pwachat/providers/proxy.py and the pool's proxy path), at the wire.

A recording proxy (tests/recording_proxy.py) stands between the providers' client and a scripted
origin (tests/raw_server.py): absolute-form requests for http origins, a CONNECT tunnel and TLS to
the origin through it for https ones, the proxy's credentials seen by the proxy and never by the
origin nor in any message, NO_PROXY bypassing it, and a proxy that refuses.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Awaitable

import pytest

from pwachat.providers.base import ChatInput, UpstreamError, UpstreamUnavailable
from pwachat.providers.http_client import Pool
from pwachat.providers.http_provider import UpstreamHTTP
from pwachat.providers.openai import OpenAIProvider
from pwachat.providers.proxy import no_proxy_matches, parse_proxy_url, proxy_for
from pwachat.settings import ConfigError, Settings
from raw_server import Handler, Server
from recording_proxy import RecordingProxy

PASSWORD = "pr0xy-s3cret"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def answer(resp: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(resp)
        await writer.drain()
        return True

    return handler


async def post(pool: Pool) -> bytes:
    resp = await pool.send(pool.request_bytes("/chat", b"{}"))
    data = await resp.read()
    resp.release()
    return data


# -- which proxy, if any -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypass"),
    [
        ("*", "api.openai.com", 443, True),
        ("openai.com", "api.openai.com", 443, True),
        (".openai.com", "api.openai.com", 443, True),
        ("*.openai.com", "api.openai.com", 443, True),
        ("openai.com", "openai.com", 443, True),
        ("OpenAI.COM", "api.openai.com", 443, True),
        ("openai.com", "notopenai.com", 443, False),
        ("api.openai.com:443", "api.openai.com", 443, True),
        ("api.openai.com:8443", "api.openai.com", 443, False),
        ("localhost, 127.0.0.1", "127.0.0.1", 8000, True),
        ("127.0.0.1", "127.0.0.2", 8000, False),
        ("10.0.0.0/8", "10.1.2.3", 80, True),
        ("10.0.0.0/8", "11.1.2.3", 80, False),
        ("::1", "::1", 80, True),
        ("[::1]:8000", "::1", 8000, True),
        ("fd00::/8", "fd12::1", 80, True),
        ("", "api.openai.com", 443, False),
        (" , ,", "api.openai.com", 443, False),
    ],
)
def test_no_proxy_matches_as_the_sdks_do(no_proxy: str, host: str, port: int, bypass: bool) -> None:
    assert no_proxy_matches(no_proxy, host, port) is bypass


def test_the_proxy_is_chosen_by_the_base_urls_scheme() -> None:
    kw = {"https_proxy": "http://s:1", "http_proxy": "http://p:2", "no_proxy": "local.test"}
    assert repr(proxy_for("https://api.openai.com/v1", **kw)) == "Proxy(s:1)"
    assert repr(proxy_for("http://gpu.lan:8000/v1", **kw)) == "Proxy(p:2)"
    assert proxy_for("http://local.test:8000/v1", **kw) is None
    assert (
        proxy_for("https://api.openai.com/v1", https_proxy=None, http_proxy="http://p:2", no_proxy="") is None
    )


def test_proxy_credentials_become_basic_auth_and_stay_out_of_reprs() -> None:
    proxy = parse_proxy_url(f"http://us%40er:{PASSWORD}@127.0.0.1:3128")
    assert proxy.authorization == "Basic " + base64.b64encode(f"us@er:{PASSWORD}".encode()).decode()
    assert PASSWORD not in repr(proxy) and PASSWORD not in proxy.where
    assert parse_proxy_url("proxy.lan").where == "proxy.lan:80"  # no scheme: http, as curl reads it


@pytest.mark.parametrize(
    "value",
    [f"https://u:{PASSWORD}@p:1", f"socks5://u:{PASSWORD}@p:1", f"http://u:{PASSWORD}@p:99999", "http://"],
)
def test_an_unusable_proxy_is_a_settings_error_that_does_not_quote_it(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_mapping({"HTTPS_PROXY": value})
    assert str(err.value).startswith("HTTPS_PROXY: ") and PASSWORD not in str(err.value)


def test_lower_case_proxy_variables_win() -> None:
    s = Settings.from_mapping(
        {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:1", "NO_PROXY": "a", "no_proxy": "b"}
    )
    assert (s.https_proxy, s.no_proxy) == ("http://lower:1", "b")
    s = Settings.from_mapping({"HTTP_PROXY": "http://upper:1"})
    assert (s.http_proxy, s.https_proxy, s.no_proxy) == ("http://upper:1", None, "")


# -- through the proxy ---------------------------------------------------------------------------


def test_an_http_origin_is_reached_with_absolute_form_requests_and_the_credentials_stay_with_the_proxy() -> (
    None
):
    async def main() -> None:
        async with Server(answer(OK)) as srv, RecordingProxy() as proxy:
            url = f"http://user:{PASSWORD}@127.0.0.1:{proxy.port}"
            pool = Pool(srv.url, {"Authorization": "Bearer k"}, proxy=parse_proxy_url(url))
            assert await post(pool) == b"ok"
            assert await post(pool) == b"ok"
            authority = srv.url.split("//")[1].split("/")[0]
            lines = [line for line, _ in proxy.seen]
            assert lines == [f"POST http://{authority}/v1/chat HTTP/1.1"] * 2
            expected = "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()
            assert all(h["proxy-authorization"] == expected for _, h in proxy.seen)
            assert proxy.connections == 1  # kept alive to the proxy
            # The origin got origin-form requests, its own headers, and nothing meant for the proxy.
            assert [r[0] for r in srv.requests] == ["POST /v1/chat HTTP/1.1"] * 2
            for _, headers, _ in srv.requests:
                assert headers["host"] == authority and headers["authorization"] == "Bearer k"
                assert "proxy-authorization" not in headers
                assert PASSWORD not in str(headers)
            await pool.aclose()

    run(main())


def test_an_https_origin_is_reached_through_a_connect_tunnel(tls_server_context: ssl.SSLContext) -> None:
    async def main() -> None:
        async with Server(answer(OK), tls=tls_server_context) as srv, RecordingProxy() as proxy:
            pool = Pool(
                srv.url + "?api-version=1",
                {},
                proxy=parse_proxy_url(f"http://u:{PASSWORD}@127.0.0.1:{proxy.port}"),
            )
            assert await post(pool) == b"ok"
            assert await post(pool) == b"ok"
            port = srv.url.split(":")[2].split("/")[0]
            assert [line for line, _ in proxy.seen] == [
                f"CONNECT localhost:{port} HTTP/1.1"
            ]  # one tunnel, reused
            assert proxy.seen[0][1]["host"] == f"localhost:{port}"
            assert proxy.seen[0][1]["proxy-authorization"].startswith("Basic ")
            # TLS to the origin itself (verified as `localhost` through the tunnel), origin-form inside.
            assert [r[0] for r in srv.requests] == ["POST /v1/chat?api-version=1 HTTP/1.1"] * 2
            assert all("proxy-authorization" not in h for _, h, _ in srv.requests)
            await pool.aclose()

    run(main())


def provider(srv: Server, **settings: object) -> OpenAIProvider:
    return OpenAIProvider(Settings(upstream_max_retries=0, **settings), base_url=srv.url, headers={})  # type: ignore[arg-type]


CHAT_BODY = (
    b'{"choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":1}}'
)
CHAT_OK = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(CHAT_BODY), CHAT_BODY)
HELLO = ChatInput(model="gpt-4o-mini", system="", history=[], message="hello", temperature=0.3, max_tokens=10)


@pytest.mark.parametrize("no_proxy", ["", "127.0.0.1", "*", "localhost,127.0.0.0/8"])
def test_providers_go_through_the_settings_proxy_unless_no_proxy_names_the_host(no_proxy: str) -> None:
    async def main() -> None:
        async with Server(answer(CHAT_OK)) as srv, RecordingProxy() as proxy:
            p = provider(srv, http_proxy=f"http://127.0.0.1:{proxy.port}", no_proxy=no_proxy)
            done = await p.complete(HELLO)
            assert done.text == "hi"
            assert len(proxy.seen) == (0 if no_proxy else 1)
            await p.aclose()

    run(main())


@pytest.mark.parametrize("status", [407, 403, 502])
def test_a_refused_tunnel_is_an_upstream_error_that_names_no_secret(
    tls_server_context: ssl.SSLContext, status: int
) -> None:
    async def main() -> None:
        async with Server(answer(OK), tls=tls_server_context) as srv, RecordingProxy(refuse=status) as proxy:
            up = UpstreamHTTP(
                label="OpenAI",
                base_url=srv.url,
                headers={"Authorization": "Bearer sk-k"},
                max_retries=0,
                map_status=None,  # type: ignore[arg-type]
                proxy=parse_proxy_url(f"http://user:{PASSWORD}@127.0.0.1:{proxy.port}"),
            )
            with pytest.raises(UpstreamError) as err:
                await up.post("/chat", b"{}")
            message = str(err.value)
            # The proxy could not reach the provider (502): worth a fallback; refused us: not.
            assert isinstance(err.value, UpstreamUnavailable) is (status == 502)
            assert f"HTTP {status}" in message and f"127.0.0.1:{proxy.port}" in message
            assert PASSWORD not in message and "user" not in message and "sk-k" not in message
            assert srv.requests == []
            await up.aclose()

    run(main())


def test_a_refused_tunnel_for_credentials_is_not_retried(tls_server_context: ssl.SSLContext) -> None:
    async def main() -> None:
        async with Server(answer(OK), tls=tls_server_context) as srv, RecordingProxy(refuse=407) as proxy:
            up = UpstreamHTTP(
                label="OpenAI",
                base_url=srv.url,
                headers={},
                max_retries=2,
                map_status=None,  # type: ignore[arg-type]
                proxy=parse_proxy_url(f"http://127.0.0.1:{proxy.port}"),
            )
            with pytest.raises(UpstreamError, match="HTTP 407"):
                await up.post("/chat", b"{}")
            assert len(proxy.seen) == 1
            await up.aclose()

    run(main())


def test_a_407_to_an_absolute_form_request_says_the_proxy_wants_credentials() -> None:
    async def main() -> None:
        async with Server(answer(OK)) as srv, RecordingProxy(refuse=407) as proxy:
            p = provider(srv, http_proxy=f"http://user:{PASSWORD}@127.0.0.1:{proxy.port}")
            with pytest.raises(UpstreamError) as err:
                await p.complete(HELLO)
            assert "proxy" in str(err.value) and "407" in str(err.value) and PASSWORD not in str(err.value)
            assert srv.requests == []
            await p.aclose()

    run(main())
