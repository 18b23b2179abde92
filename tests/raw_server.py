"""A scripted raw HTTP/1.1 server on 127.0.0.1, for wire-level tests of the providers' client.

Each connection is served by a handler that writes whatever bytes a test wants (the answers a real
provider, proxy or broken server may give), so the client can be tested on the spellings the fake
upstream (aiohttp) never produces, and on what it does when a server stalls or never finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable

__all__ = ["Handler", "Server", "hold", "read_request", "until"]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return lines[0], headers, body


class Server:
    """Each connection is served by `handler(reader, writer, request_number)` until it returns
    False (then the server closes the connection). Counts connections and keeps the requests."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                while True:
                    try:
                        self.requests.append(await read_request(reader))
                    except (asyncio.IncompleteReadError, ConnectionError):
                        return
                    if not await self.handler(reader, writer, len(self.requests)):
                        return
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"https://localhost:{port}/v1" if self.tls else f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def hold(*parts: bytes, gone: list[float], written: list[float] | None = None) -> Handler:
    """Answer `parts`, then send nothing more and keep the connection until the client closes it;
    `gone` gets the time.monotonic() at which it did (`written`, when the parts had gone out)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        for part in parts:
            writer.write(part)
            await writer.drain()
        if written is not None:
            written.append(time.monotonic())
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        gone.append(time.monotonic())
        return False

    return handler


async def until(predicate: Callable[[], object], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.005)  # polling interval under a deadline
