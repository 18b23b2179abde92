"""The relay under load: the real `pwachat serve` against the fake upstream, one table.

    python benches/load.py            # or: make bench-load (make bench runs it after the micro benches)

Layout (as the providers issue asks): one server worker pinned to core 0; the load generator (wrk,
or this script's asyncio client) and the fake upstream (tests/fake_upstream.py, its own process)
pinned to core 1. Each scenario also measures the fake directly, in the same run, so the table shows
what the relay costs on top of the upstream:

- chat:        POST /api/chat (OpenAI provider, non-streamed), requests/s (wrk, 64 connections)
- stream:      POST /api/chat/stream with 20-chunk answers, relayed events/s (wrk, 64 connections)
- concurrent:  1,000 concurrent streams, a chunk every 250 ms each: per-event relay delay
               (arrival at the client minus the fake's scheduled send time), p50/p99, and the
               server's peak resident memory
- latency:     100 requests/s, p50 latency through the server minus p50 latency to the fake
               directly (the latency the relay adds), in alternating one-second blocks

Targets (issue: real providers): chat >= 2,500 req/s; stream >= 40,000 events/s; concurrent p99
<= 20 ms and RSS < 150 MB; added latency p50 < 1 ms. This script measures; it asserts nothing.
Needs `wrk` (Debian package) and Linux (taskset, /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from server import clean_env, free_port  # noqa: E402

SERVER_CORE, LOAD_CORE = "0", "1"
OPENAI_KEY = "sk-test-openai"
CHUNKS = 20
MESSAGE = {"message": "hello bench"}


def pinned(core: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", core, *argv]


class Fake:
    """tests/fake_upstream.py in its own process, driven over its control API."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            pinned(LOAD_CORE, [sys.executable, str(ROOT / "tests" / "fake_upstream.py"), "--port", "0"]),
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"fake upstream did not start: {line!r}")
        self.url = line.split()[1]

    def control(self, path: str, payload: object = None) -> object:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def behave(self, **params: object) -> None:
        self.control("/_control/reset", {})
        self.control("/_control/behaviour", {"provider": "openai", **params})

    def requests(self) -> list[dict]:
        return self.control("/_control/requests?provider=openai")  # type: ignore[return-value]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Server:
    def __init__(self, fake: Fake, tmp: Path) -> None:
        self.port = free_port()
        env = clean_env(
            PORT=str(self.port),
            WORKERS="1",
            OPENAI_API_KEY=OPENAI_KEY,
            OPENAI_BASE_URL=fake.url + "/v1",
            RATELIMIT_PER_MINUTE="1000000000",
            RATELIMIT_PER_HOUR="1000000000",
            RATELIMIT_PER_DAY="1000000000",
            UPSTREAM_MAX_RETRIES="0",
            LOG_FILE=str(tmp / "load.log"),
        )
        self.proc = subprocess.Popen(
            pinned(SERVER_CORE, [sys.executable, "-m", "pwachat.cli", "serve"]),
            cwd=tmp,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/api/health/live", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def pids(self) -> list[int]:
        out = [self.proc.pid]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(stat.parent.name))
            except (OSError, ValueError, IndexError):
                continue
        return out

    def rss_mb(self) -> float:
        """Resident memory of the server: the Granian main process and its worker."""
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total / 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # a worker still draining its connections


# -- wrk -------------------------------------------------------------------------------------------


def wrk(url: str, body: dict, headers: dict[str, str], seconds: int, connections: int) -> dict[str, float]:
    script = "wrk.method = 'POST'\n"
    script += f"wrk.body = {json.dumps(json.dumps(body))}\n"
    for k, v in {"Content-Type": "application/json", **headers}.items():
        script += f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run(
            pinned(LOAD_CORE, ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", f.name, url]),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(f.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "non2xx": float(bad.group(1)) if bad else 0.0, "socket_errors": bool(errors)}


def openai_body(stream: bool) -> dict:
    body: dict = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello bench"}],
        "max_tokens": 100,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


# -- asyncio clients -----------------------------------------------------------------------------------


async def read_stream(port: int, message: str, arrivals: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"message": message}).encode()
    writer.write(
        b"POST /api/chat/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    await writer.drain()
    buf = b""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        now = time.monotonic()
        # One arrival time per delta event in this read.
        arrivals.extend([now] * data.count(b"event: delta"))
        buf += data
    writer.close()
    return buf.count(b"event: delta")


async def concurrent_streams(port: int, streams: int) -> list[list[float]]:
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    await asyncio.gather(*(read_stream(port, f"bench stream {i}", arrivals[i]) for i in range(streams)))
    return arrivals


async def paced_latency(
    url: str, path: str, body: dict | None, headers: dict[str, str], rate: int | None, seconds: float
):
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
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# -- scenarios ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8, help="duration of each wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams in `concurrent`")
    parser.add_argument("--only", default="chat,stream,concurrent,latency")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("benches/load.py needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    # This script is the load generator of the asyncio scenarios (concurrent, latency): it belongs
    # on the load core with wrk and the fake, not on the server's.
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    rows: list[tuple[str, str, str, str]] = []  # scenario, through pwachat, fake directly, target

    fake = Fake()
    tmp = Path(tempfile.mkdtemp(prefix="pwachat-load-"))
    server = Server(fake, tmp)
    auth = {"Authorization": f"Bearer {OPENAI_KEY}"}
    try:
        if "chat" in only:
            fake.behave()
            ours = wrk(server.url + "/api/chat", MESSAGE, {}, args.seconds, args.connections)
            direct = wrk(
                fake.url + "/v1/chat/completions", openai_body(False), auth, args.seconds, args.connections
            )
            rows.append(
                (
                    "/api/chat requests/s",
                    f"{ours['rps']:,.0f}" + (f" ({ours['non2xx']:.0f} non-2xx)" if ours["non2xx"] else ""),
                    f"{direct['rps']:,.0f}",
                    ">= 2,500",
                )
            )
        if "stream" in only:
            fake.behave(chunks=CHUNKS)
            ours = wrk(server.url + "/api/chat/stream", MESSAGE, {}, args.seconds, args.connections)
            direct = wrk(
                fake.url + "/v1/chat/completions", openai_body(True), auth, args.seconds, args.connections
            )
            rows.append(
                (
                    f"/api/chat/stream delta events/s ({CHUNKS} chunks)",
                    f"{ours['rps'] * CHUNKS:,.0f} ({ours['rps']:,.0f} streams/s)"
                    + (f" ({ours['non2xx']:.0f} non-2xx)" if ours["non2xx"] else ""),
                    f"{direct['rps'] * CHUNKS:,.0f}",
                    ">= 40,000",
                )
            )
        if "concurrent" in only:
            interval, chunks = 0.25, 24
            fake.behave(chunks=chunks, chunk_interval_s=interval)
            rss_peak = server.rss_mb()
            done = False

            async def sample_rss() -> None:
                nonlocal rss_peak
                while not done:
                    rss_peak = max(rss_peak, server.rss_mb())
                    await asyncio.sleep(0.2)

            async def run() -> list[list[float]]:
                nonlocal done
                sampler = asyncio.create_task(sample_rss())
                try:
                    return await concurrent_streams(server.port, args.streams)
                finally:
                    done = True
                    await sampler

            arrivals = asyncio.run(run())
            records = {r["body"]["messages"][-1]["content"]: r for r in fake.requests() if r.get("body")}
            delays, steady = [], []
            complete = 0
            # Steady state: once every stream has its head, the 1,000 connections are no longer
            # being opened (a ramp that costs the server ~0.3 s of work no relay can hide).
            ramp_end = max((r["head_sent_at"] or 0) for r in records.values())
            for i, times in enumerate(arrivals):
                rec = records.get(f"bench stream {i}")
                if rec is None or rec.get("head_sent_at") is None:
                    continue
                complete += len(times) == chunks
                for k, t in enumerate(times):
                    # The fake sends delta k (0-based) k + 1 intervals after its response head.
                    sent = rec["head_sent_at"] + (k + 1) * interval
                    delays.append(t - sent)
                    if sent > ramp_end:
                        steady.append(t - sent)
            rows.append(
                (
                    f"{args.streams} streams, chunk/250 ms: delay p50 / p99, steady",
                    f"{pct(steady, 50) * 1000:.1f} / {pct(steady, 99) * 1000:.1f} ms "
                    f"({len(steady)} events, {complete}/{args.streams} streams complete)",
                    "-",
                    "p99 <= 20 ms",
                )
            )
            rows.append(
                (
                    "  same, every event incl. the connection ramp: p99 / max",
                    f"{pct(delays, 99) * 1000:.1f} / {max(delays) * 1000:.1f} ms",
                    "-",
                    "",
                )
            )
            rows.append(("  server resident memory, peak", f"{rss_peak:.0f} MB", "-", "< 150 MB"))
        if "latency" in only:
            fake.behave()
            # Through pwachat and directly in alternating one-second blocks (8 s each in all), so
            # that both see the same moments of this shared machine rather than two different ones.
            ours, direct = [], []
            for _ in range(8):
                ours += asyncio.run(paced_latency(server.url, "/api/chat", MESSAGE, {}, 100, 1))
                direct += asyncio.run(
                    paced_latency(fake.url, "/v1/chat/completions", openai_body(False), auth, 100, 1)
                )
            added = statistics.median(ours) - statistics.median(direct)
            rows.append(
                (
                    "latency at 100 req/s, p50 (added by pwachat)",
                    f"{statistics.median(ours) * 1000:.2f} ms (+{added * 1000:.2f} ms)",
                    f"{statistics.median(direct) * 1000:.2f} ms",
                    "added p50 < 1 ms",
                )
            )
            # Where that time goes on this machine. Paced requests find both cores idle, and the relay
            # path wakes an idle core four times (client -> server -> fake -> server -> client) where
            # the direct path, client and fake on one core, wakes none. The same requests back to back
            # (no idle time), and a request that does nothing (the liveness probe) at 100 req/s,
            # separate that cost from the relay's own work.
            ours_b2b = asyncio.run(paced_latency(server.url, "/api/chat", MESSAGE, {}, None, 3))
            direct_b2b = asyncio.run(
                paced_latency(fake.url, "/v1/chat/completions", openai_body(False), auth, None, 3)
            )
            added_b2b = statistics.median(ours_b2b) - statistics.median(direct_b2b)
            live = asyncio.run(paced_latency(server.url, "/api/health/live", None, {}, 100, 3))
            noop = noop_latency()
            rows.append(
                (
                    "  same requests back to back, one connection, p50",
                    f"{statistics.median(ours_b2b) * 1000:.2f} ms (+{added_b2b * 1000:.2f} ms)",
                    f"{statistics.median(direct_b2b) * 1000:.2f} ms",
                    "",
                )
            )
            rows.append(
                (
                    "  GET /api/health/live at 100 req/s, p50",
                    f"{statistics.median(live) * 1000:.2f} ms",
                    "-",
                    "",
                )
            )
            rows.append(
                (
                    "  floor: an ASGI app doing nothing (Granian, same core) at 100 req/s, p50",
                    f"{statistics.median(noop) * 1000:.2f} ms",
                    "-",
                    "",
                )
            )
    finally:
        server.stop()
        fake.stop()

    header = ("scenario", "through pwachat", "fake directly", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    print()
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
