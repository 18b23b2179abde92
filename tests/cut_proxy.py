"""A TCP relay on 127.0.0.1 in front of a server, whose connections a test can cut: a real network drop.

Chromium's emulated offline (`context.set_offline`) fires the page's `offline` event but leaves a
connection it already has open streaming (seen with Chromium 148), so a dropped stream is made
here instead: `cut()` aborts every relayed connection (the browser's read fails mid-body) and,
until `restore()`, aborts each new one as soon as it is accepted (a reconnect fails too), counting
those in `refused`. Runs its own event loop in a thread, so that a sync Playwright test can use it.
"""

from __future__ import annotations

import asyncio
import threading

from recording_proxy import pipe

__all__ = ["CutProxy"]


class CutProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.host = host
        self.port = 0
        self.down = False
        self.refused = 0  # connections aborted on arrival while down
        self._open: set[asyncio.Transport] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer.transport, up_writer.transport}
        self._open |= pair
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._open -= pair

    def _cut(self) -> None:
        self.down = True
        for transport in list(self._open):
            transport.abort()

    def cut(self) -> None:
        """Abort every open connection; new ones are aborted on arrival until `restore()`."""
        assert self._loop is not None
        done = threading.Event()

        def run() -> None:
            self._cut()
            done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(5):
            raise RuntimeError("the proxy's loop did not answer")

    def restore(self) -> None:
        self.down = False

    def start(self) -> CutProxy:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(asyncio.start_server(self._serve, self.host, 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            self._server.close()
            for transport in list(self._open):
                transport.abort()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name="cut-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the proxy did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> CutProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
