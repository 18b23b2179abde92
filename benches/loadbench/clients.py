"""Load generators: wrk for throughput, this script's own asyncio clients for latency. The many-streams
scenarios' client is the pacer's (benches/pacer, driven through procs.Pacer)."""

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
from dataclasses import dataclass

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
