"""Load generators: wrk for throughput, this script's own asyncio clients for streams and latency."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from .procs import LOAD_CORE, ROOT, SERVER_CORE, free_port, pinned

# -- wrk ---------------------------------------------------------------------------------------------


@dataclass
class WrkRun:
    rps: float
    requests: int
    non2xx: int
    socket_errors: str
    seconds: float
    server_cpu_s: float = 0.0  # CPU time the server (or, run directly, nothing) used during the run
    fake_cpu_s: float = 0.0


def wrk(
    url: str,
    body: dict,
    headers: dict[str, str],
    seconds: int,
    connections: int,
    cpu: dict[str, Callable[[], float]],
) -> WrkRun:
    """wrk on the load core, POSTing `body`; `cpu` names the CPU-time counters read around the run."""
    script = "wrk.method = 'POST'\n"
    script += f"wrk.body = {json.dumps(json.dumps(body))}\n"
    for k, v in {"Content-Type": "application/json", **headers}.items():
        script += f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        before = {k: read() for k, read in cpu.items()}
        t0 = time.monotonic()
        out = subprocess.run(
            pinned(LOAD_CORE, ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", f.name, url]),
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
        elapsed = time.monotonic() - t0
        used = {k: read() - before[k] for k, read in cpu.items()}
    finally:
        os.unlink(f.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return WrkRun(
        rps=rps,
        requests=total,
        non2xx=int(bad.group(1)) if bad else 0,
        socket_errors=errors.group(1) if errors else "",
        seconds=elapsed,
        server_cpu_s=used.get("server", 0.0),
        fake_cpu_s=used.get("fake", 0.0),
    )


def openai_body(stream: bool, content: str = "hello bench", max_tokens: int = 100) -> dict:
    body: dict = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


# -- many streams at once ------------------------------------------------------------------------------

# What marks one text delta in each wire format: pwachat's SSE, and an OpenAI chunk the fake sends.
PWACHAT_DELTA = b"event: delta"
OPENAI_DELTA = b'"delta":{"content":'


@dataclass
class StreamTimes:
    started: float = 0.0  # just before connecting
    first_byte: float | None = None
    arrivals: list[float] = field(default_factory=list)  # one per delta event, when its read arrived
    closed: bool = False


class _StreamReader(asyncio.Protocol):
    """One streamed request: sends it, stamps every read, counts delta markers (across read edges)."""

    def __init__(self, request: bytes, marker: bytes, times: StreamTimes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.marker = marker
        self.times = times
        self.done = done
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        t = self.times
        if t.first_byte is None:
            t.first_byte = now
        view = self.tail + data
        n = view.count(self.marker)
        if n:
            t.arrivals.extend([now] * n)
        self.tail = view[-(len(self.marker) - 1) :]

    def connection_lost(self, exc: Exception | None) -> None:
        self.times.closed = exc is None
        if not self.done.done():
            self.done.set_result(None)


def http_post(path: str, body: dict, headers: dict[str, str] | None = None) -> bytes:
    raw = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    head += f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n"
    return head.encode() + raw


async def _streams(port: int, requests: list[bytes], marker: bytes, timeout_s: float) -> list[StreamTimes]:
    loop = asyncio.get_running_loop()
    times = [StreamTimes() for _ in requests]
    transports: list[asyncio.BaseTransport] = []

    async def one(i: int) -> None:
        done: asyncio.Future[None] = loop.create_future()
        times[i].started = time.monotonic()
        try:
            transport, _ = await loop.create_connection(
                lambda: _StreamReader(requests[i], marker, times[i], done), "127.0.0.1", port
            )
        except OSError:
            return
        transports.append(transport)
        await done

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(requests))]
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    for transport in transports:
        transport.close()
    return times


def run_streams(port: int, requests: list[bytes], marker: bytes, timeout_s: float) -> list[StreamTimes]:
    """All `requests` at once, each on its own connection to 127.0.0.1:`port`, on uvloop (the client
    shares the load core with the fake: the cheaper its reads, the more of that core the fake keeps)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_streams(port, requests, marker, timeout_s))


# -- latency -------------------------------------------------------------------------------------------


async def paced_latency(
    url: str, path: str, body: dict | None, headers: dict[str, str], rate: int | None, seconds: float
) -> list[float]:
    """Latencies of requests sent at `rate` per second (open loop), or with `rate=None` one after
    another on one connection (closed loop: no idle time between requests). `body=None` is a GET."""
    import aiohttp

    latencies: list[float] = []
    async with aiohttp.ClientSession(headers={"Content-Type": "application/json", **headers}) as session:

        async def one() -> None:
            t = time.perf_counter()
            if body is None:
                request = session.get(url + path)
            else:
                request = session.post(url + path, data=json.dumps(body))
            async with request as resp:
                await resp.read()
                if resp.status == 200:
                    latencies.append(time.perf_counter() - t)

        if rate is None:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                await one()
            return latencies
        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return latencies


def noop_latency() -> list[float]:
    """benches/noop_asgi.py under Granian on the server's core, paced like the latency scenario."""
    port = free_port()
    argv = [sys.executable, "-m", "granian", "--interface", "asgi", "--loop", "uvloop", "--http", "1"]
    proc = subprocess.Popen(
        pinned(SERVER_CORE, [*argv, "--port", str(port), "noop_asgi:app"]),
        cwd=ROOT / "benches",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return asyncio.run(paced_latency(url, "/", None, {}, 100, 3))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]
