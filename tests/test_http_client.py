"""The providers' HTTP/1.1 client (pwachat/providers/http_client.py) against a scripted raw TCP server.

The fake upstream (tests/fake_upstream.py) speaks HTTP the way aiohttp does; these answers are the
other spellings a provider, a proxy or an OpenAI-compatible server may use: chunk extensions and
trailers, bytes dribbled one at a time, bodies ended by the close, interim 1xx answers, `Connection:
close`, keep-alive connections the server drops while idle, and answers that are not HTTP.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable

import pytest

from pwachat.providers import http_client
from pwachat.providers.base import UpstreamUnavailable
from pwachat.providers.http_client import Pool, TransportError
from pwachat.providers.http_provider import UpstreamHTTP
from raw_server import Handler, Server, hold, until


def answer(*parts: bytes, keep: bool = True, dribble: bool = False) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        for part in parts:
            if dribble:
                for i in range(len(part)):
                    writer.write(part[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(0)
            else:
                writer.write(part)
                await writer.drain()
        return keep

    return handler


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def post(pool: Pool, body: bytes = b'{"x":1}') -> tuple[int, dict[str, str], bytes]:
    resp = await pool.send(pool.request_bytes("/chat", body))
    data = await resp.read()
    resp.release()
    return resp.status, resp.headers, data


def test_the_request_is_one_post_with_the_given_headers_and_body() -> None:
    async def main() -> None:
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        async with Server(answer(ok)) as srv:
            pool = Pool(srv.url, {"Authorization": "Bearer k", "content-type": "application/json"})
            assert await post(pool, b'{"a":"b"}') == (200, {"content-length": "2"}, b"ok")
            line, headers, body = srv.requests[0]
            assert line == "POST /v1/chat HTTP/1.1"
            assert body == b'{"a":"b"}'
            assert headers["host"] == srv.url.split("//")[1].split("/")[0]
            assert headers["authorization"] == "Bearer k"
            assert headers["content-type"] == "application/json"
            assert headers["content-length"] == "9"
            assert headers["accept-encoding"] == "identity"
            await pool.aclose()

    run(main())


def test_keep_alive_reuses_one_connection() -> None:
    async def main() -> None:
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        async with Server(answer(ok)) as srv:
            pool = Pool(srv.url, {})
            for _ in range(5):
                assert (await post(pool))[2] == b"ok"
            assert srv.connections == 1
            await pool.aclose()

    run(main())


@pytest.mark.parametrize("dribble", [False, True])
def test_chunked_bodies_with_extensions_and_trailers(dribble: bool) -> None:
    async def main() -> None:
        chunked = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: yes\r\n\r\n"
        )
        async with Server(answer(chunked, dribble=dribble)) as srv:
            pool = Pool(srv.url, {})
            assert (await post(pool))[2] == b"hello world"
            assert (await post(pool))[2] == b"hello world"
            assert srv.connections == 1  # the trailer ended the answer: the connection was reusable
            await pool.aclose()

    run(main())


def test_a_content_length_body_dribbled_byte_by_byte() -> None:
    async def main() -> None:
        resp = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"
        async with Server(answer(resp, dribble=True)) as srv:
            pool = Pool(srv.url, {})
            assert (await post(pool))[2] == b"hello world"
            await pool.aclose()

    run(main())


def test_a_body_ended_by_the_close_is_whole_and_the_connection_is_not_reused() -> None:
    async def main() -> None:
        resp = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: a\n\ndata: b\n\n"
        async with Server(answer(resp, keep=False)) as srv:
            pool = Pool(srv.url, {})
            assert (await post(pool))[2] == b"data: a\n\ndata: b\n\n"
            assert (await post(pool))[2] == b"data: a\n\ndata: b\n\n"
            assert srv.connections == 2
            await pool.aclose()

    run(main())


def test_interim_answers_are_skipped() -> None:
    async def main() -> None:
        resp = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n"
        resp += b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
        async with Server(answer(resp)) as srv:
            pool = Pool(srv.url, {})
            status, headers, body = await post(pool)
            assert (status, body) == (201, b"ok") and "link" not in headers
            await pool.aclose()

    run(main())


def test_connection_close_means_a_new_connection_next_time() -> None:
    async def main() -> None:
        resp = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        async with Server(answer(resp)) as srv:  # the server would keep it; the header says no
            pool = Pool(srv.url, {})
            await post(pool)
            await post(pool)
            assert srv.connections == 2
            await pool.aclose()

    run(main())


def test_a_keep_alive_connection_the_server_dropped_while_idle_is_replaced() -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return False  # keep-alive announced, then closed (an idle timeout on the server)

        async with Server(handler) as srv:
            pool = Pool(srv.url, {})
            for _ in range(3):
                assert (await post(pool))[2] == b"ok"
                await until(lambda: all(c.closed for c in pool._idle), 5, "the close seen")
            assert srv.connections == 3
            await pool.aclose()

    run(main())


@pytest.mark.parametrize("retries", [0, 1])
def test_a_reused_connection_closed_under_a_request_is_resent_only_within_the_retries(retries: int) -> None:
    """The server read the second POST and closed without answering (what a keep-alive timeout
    racing our write looks like): the pool does not resend it itself (StaleConnection); the
    provider's client resends it only as one of its UPSTREAM_MAX_RETRIES."""

    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
            if n == 2:
                return False  # read, then closed unanswered
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return True

        async with Server(handler) as srv:
            up = UpstreamHTTP(label="P", base_url=srv.url, headers={}, max_retries=retries, map_status=None)  # type: ignore[arg-type]
            first = await up.post("/chat", b"{}")
            assert await first.read() == b"ok"
            first.release()  # pooled: the next request goes out on it
            if retries:
                resp = await up.post("/chat", b"{}")
                assert await resp.read() == b"ok"
                resp.release()
                assert len(srv.requests) == 3
            else:
                with pytest.raises(UpstreamUnavailable):
                    await up.post("/chat", b"{}")
                assert len(srv.requests) == 2  # sent once: no retry was allowed
            await up.aclose()

    run(main())


def test_a_connection_that_spoke_out_of_turn_while_idle_is_not_reused() -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await asyncio.sleep(0.05)  # after the client has pooled it: the stray byte comes idle
            writer.write(b"X")
            await writer.drain()
            return True

        async with Server(handler) as srv:
            pool = Pool(srv.url, {})
            await post(pool)
            await until(lambda: pool._idle and not pool._idle[0].reusable, 5, "the stray byte")
            assert (await post(pool))[2] == b"ok"
            assert srv.connections == 2
            await pool.aclose()

    run(main())


@pytest.mark.parametrize(
    ("keep_alive", "reused"), [(b"", True), (b"Keep-Alive: timeout=5, max=100\r\n", False)]
)
def test_the_servers_keep_alive_timeout_shortens_the_idle_limit(keep_alive: bytes, reused: bool) -> None:
    async def main() -> None:
        ok = b"HTTP/1.1 200 OK\r\n" + keep_alive + b"Content-Length: 2\r\n\r\nok"
        async with Server(answer(ok)) as srv:
            pool = Pool(srv.url, {})
            await post(pool)
            pool._idle[0].idle_since -= 4.5  # idle 4.5 s: past timeout=5 less the margin, within 30 s
            await post(pool)
            assert srv.connections == (1 if reused else 2)
            await pool.aclose()

    run(main())


def test_a_keep_alive_timeout_within_the_margin_means_no_reuse() -> None:
    async def main() -> None:
        ok = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1\r\nContent-Length: 2\r\n\r\nok"
        async with Server(answer(ok)) as srv:
            pool = Pool(srv.url, {})
            await post(pool)
            assert not pool._idle
            await pool.aclose()

    run(main())


def test_idle_connections_are_capped_and_swept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_client, "MAX_IDLE_PER_POOL", 2)

    async def main() -> None:
        gone: list[int] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
            await asyncio.sleep(0.05)  # so that the requests overlap and need connections of their own
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return True

        async with Server(handler) as srv:
            pool = Pool(srv.url, {})
            await asyncio.gather(*(post(pool) for _ in range(5)))
            assert srv.connections == 5
            assert len(pool._idle) == 2  # the three least recently used were closed
            oldest, newest = pool._idle
            oldest.idle_since -= 60  # past its idle limit: closed on the next take or release
            await post(pool)
            assert oldest.closed or oldest.transport.is_closing()  # type: ignore[union-attr]
            assert pool._idle == [newest]
            gone.append(1)
            await pool.aclose()

    run(main())


def test_a_break_mid_body_returns_what_came_then_raises() -> None:
    async def main() -> None:
        resp = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
        async with Server(answer(resp, keep=False)) as srv:
            pool = Pool(srv.url, {})
            r = await pool.send(pool.request_bytes("/chat", b"{}"))
            got = b""
            with pytest.raises(TransportError):
                while chunk := await r.readany():
                    got += chunk
            assert got == b"partial"
            r.close()
            with pytest.raises(TransportError):
                await post(pool)  # same again through read()
            await pool.aclose()

    run(main())


@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nabcde\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nab",  # '\u00b2'.isdigit() is true
        b"HTTP/1.1 2\xb200 OK\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: notchunked\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: "
        + b"a" * (http_client.MAX_HEAD_BYTES + 10)
        + b"\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_answers_that_are_not_http_are_errors_not_hangs(garbage: bytes) -> None:
    async def main() -> None:
        crashes: list[dict[str, object]] = []  # an exception out of the protocol: a bug, not a refusal
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: crashes.append(context))
        async with Server(answer(garbage)) as srv:
            pool = Pool(srv.url, {})
            with pytest.raises(TransportError):
                async with asyncio.timeout(5):
                    await post(pool)
            await pool.aclose()
        assert not [c for c in crashes if "protocol" in str(c.get("message", "")).lower()]

    run(main())


def test_a_large_body_flows_through_the_paused_transport() -> None:
    async def main() -> None:
        big = bytes(range(256)) * (4 * 4096)  # 4 MiB, past the pause threshold
        resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big
        async with Server(answer(resp)) as srv:
            pool = Pool(srv.url, {})
            r = await pool.send(pool.request_bytes("/chat", b"{}"))
            got = bytearray()
            while chunk := await r.readany():
                got += chunk
                await asyncio.sleep(0.001)  # a slow reader: the transport pauses and resumes
            assert bytes(got) == big
            r.release()
            assert (await post(pool))[2] == big  # and the connection was still good
            assert srv.connections == 1
            await pool.aclose()

    run(main())


def test_a_refused_connection_is_connect_failed() -> None:
    from pwachat.providers.http_client import ConnectFailed
    from server import free_port

    async def main() -> None:
        pool = Pool(f"http://127.0.0.1:{free_port()}/v1", {})
        with pytest.raises(ConnectFailed):
            await post(pool)

    run(main())


@pytest.mark.parametrize("headers", [{"X-A": "b\r\nX-Injected: 1"}, {"X-A\n": "b"}, {"": "b"}, {"X:A": "b"}])
def test_headers_that_would_break_the_request_are_refused(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Pool("http://127.0.0.1:9/v1", headers)


@pytest.mark.parametrize(
    ("url", "host", "target"),
    [
        ("https://api.openai.com/v1", "api.openai.com", "/v1/chat"),
        ("http://localhost:11434/v1/", "localhost:11434", "/v1/chat"),
        ("http://[::1]:8000", "[::1]:8000", "/chat"),
        ("http://example.com:80/", "example.com", "/chat"),
    ],
)
def test_host_and_target_from_the_base_url(url: str, host: str, target: str) -> None:
    pool = Pool(url, {})
    head = pool.request_bytes("/chat", b"").decode()
    assert head.startswith(f"POST {target} HTTP/1.1\r\nHost: {host}\r\n")
    assert (pool.ssl is not None) == url.startswith("https")


def test_a_whole_answer_larger_than_the_limit_is_refused() -> None:
    async def main() -> None:
        resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
        async with Server(answer(resp)) as srv:
            pool = Pool(srv.url, {})
            r = await pool.send(pool.request_bytes("/chat", b"{}"))
            with pytest.raises(TransportError):
                await r.read(limit=1000)
            r.release()  # dropped, not pooled
            assert (await post(pool))[2] == b"x" * 5000
            assert srv.connections == 2

    run(main())


def test_a_stream_released_before_its_closing_chunk_is_pooled_once_it_ends() -> None:
    # The relay releases a stream as soon as its last event is parsed; the chunk that ends the
    # body is often still in flight. The connection is read to its end and then reused.
    async def main() -> None:
        finish = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nevent!\r\n")
            await writer.drain()
            if n == 1:
                await finish.wait()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True

        async with Server(handler) as srv:
            pool = Pool(srv.url, {})
            r = await pool.send(pool.request_bytes("/chat", b"{}"))
            assert await r.readany() == b"event!"
            r.release()  # the end has not come yet
            finish.set()
            async with asyncio.timeout(5):
                while not pool._idle:  # noqa: ASYNC110 - pooled once the closing chunk is read
                    await asyncio.sleep(0.001)
            assert (await post(pool))[2] == b"event!"
            assert srv.connections == 1
            await pool.aclose()

    run(main())


def test_closing_a_released_response_leaves_the_pooled_connection_alone() -> None:
    # The relay may close a stream again after releasing it (the client-gone callback firing
    # late); the connection may by then serve another request.
    async def main() -> None:
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        async with Server(answer(ok)) as srv:
            pool = Pool(srv.url, {})
            first = await pool.send(pool.request_bytes("/chat", b"{}"))
            assert await first.read() == b"ok"
            first.release()
            second = await pool.send(pool.request_bytes("/chat", b"{}"))  # the same connection
            first.close()
            assert await second.read() == b"ok"
            second.release()
            assert (await post(pool))[2] == b"ok"
            assert srv.connections == 1
            with pytest.raises(TransportError):
                await first.read()
            await pool.aclose()

    run(main())


def test_https_base_urls_speak_tls_and_verify_the_server(tls_server_context: ssl.SSLContext) -> None:
    async def main() -> None:
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        async with Server(answer(ok), tls=tls_server_context) as srv:
            pool = Pool(srv.url, {"Authorization": "Bearer k"})
            assert await post(pool) == (200, {"content-length": "2"}, b"ok")
            assert (await post(pool))[2] == b"ok"
            assert srv.connections == 1  # kept alive over TLS too
            assert srv.requests[0][1]["host"] == srv.url.split("//")[1].split("/")[0]
            await pool.aclose()

    run(main())


def test_a_certificate_that_does_not_verify_is_connect_failed(
    tls_server_context: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import trustme

    from pwachat.providers.http_client import ConnectFailed

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    monkeypatch.setenv("SSL_CERT_FILE", str(other))  # trusts some other CA, not the server's

    async def main() -> None:
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        async with Server(answer(ok), tls=tls_server_context) as srv:
            pool = Pool(srv.url, {})
            with pytest.raises(ConnectFailed):
                await post(pool)
            # Nor, with the right CA, for a name the certificate does not carry.
            monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
            pool = Pool(srv.url.replace("localhost", "127.0.0.1"), {})
            with pytest.raises(ConnectFailed):
                await post(pool)
            assert srv.requests == []  # nothing was ever sent in the clear or to the wrong peer

    run(main())


# --------------------------------------------------------------------------------------------
# Connections always end: a cancel, a timeout, a stalled end, a shutdown


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_giving_up_while_waiting_for_the_head_closes_the_connection(how: str) -> None:
    # The relay cancels the opening request when its reader leaves; the provider must see it go.
    async def main() -> None:
        gone: list[float] = []
        async with Server(hold(gone=gone)) as srv:
            pool = Pool(srv.url, {})
            send = pool.send(pool.request_bytes("/chat", b"{}"))
            if how == "cancel":
                task = asyncio.ensure_future(send)
                await until(lambda: srv.requests, 5, "the request reached the server")
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await send
            gave_up = time.monotonic()
            await until(lambda: gone, 1.0, "the server saw the connection close")
            assert gone[0] - gave_up < 1.0 and not pool._idle
            await pool.aclose()

    run(main())


@pytest.mark.parametrize("how", ["cancel", "timeout"])
@pytest.mark.parametrize(
    "head",
    [
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{"half": \r\n',
        b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"half": ',
    ],
    ids=["chunked", "content-length"],
)
def test_a_whole_body_read_cut_short_closes_the_connection(head: bytes, how: str) -> None:
    # /api/chat bounds `read()` with UPSTREAM_TIMEOUT_S: after its 504 the provider must stop, not be
    # read to the end in the background (and billed) for a client that has had its answer.
    async def main() -> None:
        gone: list[float] = []
        async with Server(hold(head, gone=gone)) as srv:
            pool = Pool(srv.url, {})
            resp = await pool.send(pool.request_bytes("/chat", b"{}"))
            if how == "cancel":
                task = asyncio.ensure_future(resp.read())
                conn = resp._conn
                await until(lambda: conn.waiter is not None, 1, "the read waiting for the rest")
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await resp.read()
            gave_up = time.monotonic()
            resp.release()  # what a caller's cleanup does anyway: too late to pool it
            await until(lambda: gone, 1.0, "the server saw the connection close")
            assert gone[0] - gave_up < 1.0 and not pool._idle
            await pool.aclose()

    run(main())


def test_a_released_stream_whose_closing_chunk_never_comes_is_closed_soon() -> None:
    async def main() -> None:
        gone: list[float] = []
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nevent!\r\n"
        async with Server(hold(head, gone=gone)) as srv:
            pool = Pool(srv.url, {})
            resp = await pool.send(pool.request_bytes("/chat", b"{}"))
            assert await resp.readany() == b"event!"
            resp.release()  # the last event is in; the closing chunk never will be
            released = time.monotonic()
            drain_s = getattr(http_client, "DRAIN_TIMEOUT_S", 1.0)
            await until(lambda: gone, drain_s + 1.0, "the drained connection closed")
            assert gone[0] - released >= drain_s * 0.9  # it was given its chance first
            assert not pool._idle
            await pool.aclose()

    run(main())


def test_aclose_closes_connections_still_draining(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_client, "DRAIN_TIMEOUT_S", 60.0, raising=False)  # only aclose can end it

    async def main() -> None:
        gone: list[float] = []
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nevent!\r\n"
        async with Server(hold(head, gone=gone)) as srv:
            pool = Pool(srv.url, {})
            resp = await pool.send(pool.request_bytes("/chat", b"{}"))
            assert await resp.readany() == b"event!"
            resp.release()
            await pool.aclose()
            await until(lambda: gone, 1.0, "the server saw the draining connection close")

    run(main())


def test_a_response_dropped_without_release_or_close_closes_its_connection() -> None:
    # A leak elsewhere (an opened stream nobody took) must not hold the provider's request forever.
    async def main() -> None:
        gone: list[float] = []
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nevent!\r\n"
        async with Server(hold(head, gone=gone)) as srv:
            pool = Pool(srv.url, {})
            resp = await pool.send(pool.request_bytes("/chat", b"{}"))
            assert resp.status == 200
            del resp
            await until(lambda: gone, 1.0, "the server saw the connection close")
            await pool.aclose()

    run(main())


def test_an_interrupted_read_raises_timeout_and_loses_nothing() -> None:
    # The relay keeps one timer per stream; when it fires, `interrupt()` ends the pending read with
    # TimeoutError, and the connection goes on: what arrives later (or had arrived) is read next.
    async def main() -> None:
        more = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
            await writer.drain()
            await more.wait()
            writer.write(b"3\r\ntwo\r\n0\r\n\r\n")
            await writer.drain()
            return True

        async with Server(handler) as srv:
            pool = Pool(srv.url, {})
            r = await pool.send(pool.request_bytes("/chat", b"{}"))
            assert await r.readany() == b"one"
            pending = asyncio.ensure_future(r.readany())
            await asyncio.sleep(0)  # the read is waiting now
            r.interrupt()
            with pytest.raises(TimeoutError):
                await pending
            r.interrupt()  # an interrupt that finds bytes waiting gives the bytes
            more.set()
            data = b""
            async with asyncio.timeout(5):
                while data != b"two":
                    try:
                        data += await r.readany()
                    except TimeoutError:
                        continue
            assert await r.readany() == b""  # the end, and no interrupt left over
            r.release()
            assert (await post(pool))[2] == b"onetwo"  # the connection was pooled: reused
            assert srv.connections == 1
            await pool.aclose()

    run(main())


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\n",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\r\n",
    ],
)
def test_a_head_ended_by_bare_line_feeds_is_read_at_once(head: bytes) -> None:
    async def main() -> None:
        async with Server(hold(head + b"ok", gone=[])) as srv:  # and then nothing: no end to wait for
            pool = Pool(srv.url, {})
            async with asyncio.timeout(5):
                status, headers, body = await post(pool)
            assert (status, headers, body) == (200, {"content-length": "2"}, b"ok")
            await pool.aclose()

    run(main())


def test_repeated_headers_are_joined_in_order() -> None:
    async def main() -> None:
        repeats = b"".join(b"X-Many: %d\r\n" % i for i in range(3000))
        ok = b"HTTP/1.1 200 OK\r\n" + repeats + b"Content-Length: 2\r\n\r\nok"
        async with Server(answer(ok)) as srv:
            pool = Pool(srv.url, {})
            _, headers, _ = await post(pool)
            assert headers["x-many"] == ", ".join(str(i) for i in range(3000))
            await pool.aclose()

    run(main())


def test_a_gzip_answer_is_refused_but_identity_is_read() -> None:
    async def main() -> None:
        ok = b"HTTP/1.1 200 OK\r\nContent-Encoding: identity\r\nContent-Length: 2\r\n\r\nok"
        async with Server(answer(ok)) as srv:
            pool = Pool(srv.url, {})
            assert (await post(pool))[2] == b"ok"
            await pool.aclose()

    run(main())


def test_the_base_urls_query_is_kept_on_every_request() -> None:
    async def main() -> None:
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        async with Server(answer(ok)) as srv:
            pool = Pool(srv.url + "/deployments/d?api-version=2024-10-21", {})
            await post(pool)
            await post(pool)
            assert [r[0] for r in srv.requests] == [
                "POST /v1/deployments/d/chat?api-version=2024-10-21 HTTP/1.1"
            ] * 2
            await pool.aclose()

    run(main())


@pytest.mark.parametrize(
    ("url", "host", "target"),
    [
        ("http://bücher.example/v1", "xn--bcher-kva.example", "/v1/chat"),
        ("https://BÜCHER.example:8443/v1/", "xn--bcher-kva.example:8443", "/v1/chat"),
        (
            "https://r.example/openai/deployments/d/?api-version=1",
            "r.example",
            "/openai/deployments/d/chat?api-version=1",
        ),
        ("https://r.example/v1?api-version=1/", "r.example", "/v1/chat?api-version=1"),  # the Anthropic SDK's
    ],
)
def test_idn_hosts_and_queries_in_the_base_url(url: str, host: str, target: str) -> None:
    pool = Pool(url, {})
    head = pool.request_bytes("/chat", b"").decode()
    assert head.startswith(f"POST {target} HTTP/1.1\r\nHost: {host}\r\n")
