"""The providers' HTTP/1.1 client over TLS and on both event loops, at the wire.

The server runs its provider client on uvloop; the other tests of the client run on asyncio's own
loop. The two SSL transports differ (uvloop's is its own Cython port), and both hand a buffered
protocol its decrypted bytes through `get_buffer`/`buffer_updated`, into the one read buffer the
pool's connections share. So each behaviour here runs on both loops: a stream whose every chunk is
a TLS record of its own (what a provider sends, one write per event) with many records in one
read, connections reused through TLS (one handshake), concurrent connections whose reads
interleave in that shared buffer, a body many times that buffer's size through a paused
transport, and TLS through an egress proxy's CONNECT tunnel.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from pwachat.providers.http_client import READ_BUFFER, Pool
from pwachat.providers.proxy import parse_proxy_url
from raw_server import Server
from recording_proxy import RecordingProxy

LOOPS: dict[str, Callable[[Awaitable[object]], object]] = {
    "asyncio": asyncio.run,  # type: ignore[dict-item]
    "uvloop": uvloop.run,  # type: ignore[dict-item]
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[object]], object]:
    return LOOPS[request.param]


def frame(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def read_stream(pool: Pool, body: bytes = b"{}") -> bytes:
    resp = await pool.send(pool.request_bytes("/chat", body))
    got = bytearray()
    while chunk := await resp.readany():
        got += chunk
    resp.release()
    return bytes(got)


def test_a_stream_of_one_tls_record_per_event_is_whole_and_its_connection_reused(
    run: Callable[[Awaitable[object]], object], tls_server_context: ssl.SSLContext
) -> None:
    events = [b'data: {"n":%d,"pad":"%s"}\n\n' % (i, b"x" * (i % 97)) for i in range(300)]
    sessions: list[object] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        sessions.append(writer.get_extra_info("ssl_object"))
        writer.write(HEAD)
        for event in events:  # one write each: one TLS record each, all in flight before a read
            writer.write(frame(event))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def main() -> None:
        async with Server(handler, tls=tls_server_context) as srv:
            pool = Pool(srv.url, {})
            for _ in range(3):
                assert await read_stream(pool) == b"".join(events)
            assert srv.connections == 1  # kept alive through TLS: one handshake for the three
            assert len(sessions) == 3 and all(s is not None for s in sessions)
            await pool.aclose()

    run(main())


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_concurrent_connections_share_the_read_buffer_without_mixing_their_bytes(
    run: Callable[[Awaitable[object]], object], tls_server_context: ssl.SSLContext, tls: bool
) -> None:
    streams = 8

    def events_of(who: bytes) -> list[bytes]:
        return [b"data: %b %d %b\n\n" % (who, i, who * (i % 50)) for i in range(120)]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        who = srv.requests[n - 1][2]
        writer.write(HEAD)
        for i, event in enumerate(events_of(who)):
            writer.write(frame(event))
            if i % 7 == 0:
                await writer.drain()
                await asyncio.sleep(0)  # let the other connections' bytes in between
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    srv = Server(handler, tls=tls_server_context if tls else None)

    async def main() -> None:
        async with srv:
            pool = Pool(srv.url, {})
            names = [b"s%02d" % i for i in range(streams)]
            for _ in range(2):  # fresh connections, then the same ones again from the pool
                got = await asyncio.gather(*(read_stream(pool, name) for name in names))
                assert got == [b"".join(events_of(name)) for name in names]
            assert srv.connections == streams
            await pool.aclose()

    run(main())


def test_a_tls_body_many_times_the_read_buffer_flows_through_the_paused_transport(
    run: Callable[[Awaitable[object]], object], tls_server_context: ssl.SSLContext
) -> None:
    big = bytes(range(256)) * (4 * 4096)  # 4 MiB: 64 read buffers, past the pause threshold
    assert len(big) > 32 * READ_BUFFER

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big))
        for i in range(0, len(big), 100_000):  # records up to 16 KiB, written in bursts
            writer.write(big[i : i + 100_000])
            await writer.drain()
        return True

    async def main() -> None:
        async with Server(handler, tls=tls_server_context) as srv:
            pool = Pool(srv.url, {})
            resp = await pool.send(pool.request_bytes("/chat", b"{}"))
            got = bytearray()
            while chunk := await resp.readany():
                got += chunk
                await asyncio.sleep(0.001)  # a slow reader: the transport pauses and resumes
            assert bytes(got) == big
            resp.release()
            resp = await pool.send(pool.request_bytes("/chat", b"{}"))
            assert await resp.read() == big  # the connection was still good
            resp.release()
            assert srv.connections == 1
            await pool.aclose()

    run(main())


def test_a_stream_through_a_connect_tunnel_is_whole_and_the_tunnel_reused(
    run: Callable[[Awaitable[object]], object], tls_server_context: ssl.SSLContext
) -> None:
    """CONNECT on the bare socket, then each loop's own SSL transport over it (pwachat/providers/proxy.py)."""
    events = [b'data: {"n":%d}\n\n' % i for i in range(200)]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(HEAD)
        for event in events:
            writer.write(frame(event))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def main() -> None:
        async with Server(handler, tls=tls_server_context) as srv, RecordingProxy() as proxy:
            pool = Pool(srv.url, {}, proxy=parse_proxy_url(f"http://u:p@127.0.0.1:{proxy.port}"))
            for _ in range(3):
                assert await read_stream(pool) == b"".join(events)
            assert [line.split()[0] for line, _ in proxy.seen] == ["CONNECT"]
            assert srv.connections == 1
            await pool.aclose()

    run(main())
