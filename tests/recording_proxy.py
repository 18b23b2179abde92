"""A small forward proxy on 127.0.0.1 that records what passed through it, for the egress-proxy tests.

It speaks the two things a client asks of an HTTP proxy: `CONNECT host:port` (answered 200, then the
bytes are piped both ways: TLS to the origin passes through unread) and absolute-form requests
(`POST http://host:port/path HTTP/1.1`, forwarded in origin form with the hop-by-hop
`Proxy-Authorization` and `Proxy-Connection` dropped, as a proxy must). Every request head it read
is kept in `seen` (request line, headers lower-cased). `refuse` makes it answer every request with
that status instead (407 with `Proxy-Authenticate`). Run in the test's loop (`async with`) or in a
thread of its own (`start_in_thread`) for a server process to use.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from urllib.parse import urlsplit

__all__ = ["RecordingProxy", "pipe"]


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return lines[0], headers


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy `reader` to `writer` until either side ends (shared by the tests' proxies)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class RecordingProxy:
    def __init__(self, refuse: int | None = None) -> None:
        self.refuse = refuse
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        pump: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    line, headers = await _read_head(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.seen.append((line, {k.lower(): v for k, v in headers}))
                method, target, version = line.split(" ", 2)
                if self.refuse is not None:
                    writer.write(
                        b'HTTP/1.1 %d Refused\r\nProxy-Authenticate: Basic realm="p"\r\n'
                        b"Content-Length: 0\r\nConnection: close\r\n\r\n" % self.refuse
                    )
                    await writer.drain()
                    return
                if method == "CONNECT":
                    host, _, port = target.rpartition(":")
                    up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await writer.drain()
                    back = asyncio.ensure_future(pipe(up_reader, writer))
                    await pipe(reader, up_writer)
                    await back
                    return
                url = urlsplit(target)
                length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
                body = await reader.readexactly(length)
                if upstream is None or upstream[1].is_closing():
                    upstream = await asyncio.open_connection(url.hostname, url.port or 80)
                    pump = asyncio.ensure_future(pipe(upstream[0], writer))
                path = url.path + (f"?{url.query}" if url.query else "")
                kept = [
                    (k, v) for k, v in headers if k.lower() not in ("proxy-authorization", "proxy-connection")
                ]
                head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in kept) + "\r\n"
                upstream[1].write(head.encode("latin-1") + body)
                await upstream[1].drain()
        finally:
            if pump is not None:
                pump.cancel()
            if upstream is not None:
                upstream[1].close()
            writer.close()

    def _spawn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> RecordingProxy:
        self._server = await asyncio.start_server(self._spawn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def __aenter__(self) -> RecordingProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start_in_thread(self) -> RecordingProxy:
        """Serve from a daemon thread's own loop (for a server process to reach); `stop_thread()`."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start())
            ready.set()
            try:
                self._loop.run_forever()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="recording-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the proxy did not start within 10 s")
        return self

    def stop_thread(self) -> None:
        asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
