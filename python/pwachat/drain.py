"""The drain on SIGTERM (and SIGINT, which Granian treats alike), in each worker process.

What Granian 2.8 does by itself when a worker gets the signal (its own handler, on the worker's
event loop): the worker stops accepting at once (its listening socket is closed, so new
connections are refused), closes its idle keep-alive connections, lets every request under way
finish (answered with `Connection: close`), waits for all of them without any limit, and only then
sends the ASGI lifespan `shutdown`. So the lifespan comes too late to tell anyone to hurry, and
nothing bounds the wait.

What this module adds, chained in front of Granian's handler: from the signal on, `DRAIN.draining`
is set, and every request that still reaches the app (one whose head was under way on an open
connection when the signal came) is answered `503 shutting_down` by the edge. `SHUTDOWN_GRACE_S`
later, `DRAIN.over` is set, `DRAIN.ending` is done and the relay ends every stream still running
with an `error` event `shutting_down`, its upstream connection closed; Granian's wait then ends and
the worker exits. Granian's `workers_kill_timeout` (cli.py) is a little longer than the grace.

One object per process, read where it is needed (the edge, the relay) rather than handed down:
there is one signal per process, and this costs an attribute read per request.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["DRAIN", "RETRY_AFTER_S", "Drain", "install"]

log = logging.getLogger("pwachat.drain")

#: What a 503 shutting_down tells the client to wait: a restarted instance (or another one) is
#: usually there by then.
RETRY_AFTER_S = 5
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Drain:
    """This process's drain: `draining` from the signal on, `over` (and `ending` done) once the
    grace has passed."""

    __slots__ = ("draining", "ending", "over", "timer")

    def __init__(self) -> None:
        self.draining = False
        self.over = False
        self.ending: asyncio.Future[None] | None = None  # made by `install`, on the worker's loop
        self.timer: asyncio.TimerHandle | None = None

    def begin(self, grace_s: float, on_over: Callable[[], int], streams: Callable[[], int]) -> None:
        """On the loop, once per signal: start the grace (a second signal changes nothing)."""
        if self.timer is not None or self.over:
            return
        log.info("draining: no new requests; %d streams get %g s to finish", streams(), grace_s)
        self.timer = asyncio.get_running_loop().call_later(grace_s, self.end, on_over)

    def end(self, on_over: Callable[[], int]) -> None:
        self.timer = None
        self.over = True
        if self.ending is not None and not self.ending.done():
            self.ending.set_result(None)
        ended = on_over()
        if ended:
            log.info("drain grace over: %d streams ended with shutting_down", ended)


DRAIN = Drain()


def _nothing() -> None:
    pass


def install(grace_s: float, on_over: Callable[[], int], streams: Callable[[], int]) -> Callable[[], None]:
    """Chain the drain in front of the SIGTERM/SIGINT handlers of the server running this app (in
    a Granian worker: Granian's, set before the lifespan starts). Returns what undoes it. Nothing
    is installed off the main thread or where nobody handles SIGTERM (the app served in-process,
    by a test client): there nothing would stop the server after the drain."""
    if threading.current_thread() is not threading.main_thread():
        return _nothing
    if not callable(signal.getsignal(signal.SIGTERM)):
        return _nothing
    loop = asyncio.get_running_loop()
    DRAIN.ending = loop.create_future()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        # A plain attribute first, so that no request the server still hands over after this gets
        # through; then the server's own handler (Granian: stop accepting, wait for what runs);
        # the grace's timer is started on the loop.
        DRAIN.draining = True
        previous[signum](signum, frame)
        loop.call_soon_threadsafe(DRAIN.begin, grace_s, on_over, streams)

    for sig in SIGNALS:
        prev = signal.getsignal(sig)
        if callable(prev):
            previous[sig] = prev
            signal.signal(sig, handler)

    def uninstall() -> None:
        for sig, prev in previous.items():
            signal.signal(sig, prev)
        if DRAIN.timer is not None:
            DRAIN.timer.cancel()
            DRAIN.timer = None

    return uninstall
