"""How many requests one worker holds at once (`MAX_CONCURRENCY`): held streams are long requests,
and the default must not cap a worker near 1,000 (Granian's own default is its backlog, 1,024).
The real `pwachat serve` with one worker, the fake upstream holding every stream open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import time
from collections.abc import Iterator

import pytest

from fake_upstream import FakeUpstream
from server import Server, start_server, stop_server

pytestmark = pytest.mark.e2e

OPENAI_KEY = "sk-test-concurrency"
ANTHROPIC_KEY = "sk-ant-test-concurrency"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    # Each held stream is a client socket here, a server socket in the fake and two in the server.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))
    with FakeUpstream(OPENAI_KEY, ANTHROPIC_KEY) as upstream:
        yield upstream


def serve(tmp, fake: FakeUpstream, **env: str) -> Server:
    return start_server(
        tmp,
        OPENAI_API_KEY=OPENAI_KEY,
        OPENAI_BASE_URL=fake.openai_base_url,
        UPSTREAM_MAX_RETRIES="0",
        WORKERS="1",
        RATELIMIT_PER_MINUTE="100000",
        RATELIMIT_PER_HOUR="100000",
        RATELIMIT_PER_DAY="100000",
        TOKENS_PER_DAY="0",  # one caller holding 1500 streams: no budget covers that (nor should)
        LOG_LEVEL="WARNING",
        **env,
    )


async def _hold(
    port: int, started: list[float], release: asyncio.Event, all_in: asyncio.Event, count: int
) -> None:
    """One stream: read until its `start` event, note when, then hold the connection open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"message": "hold", "provider": "openai"}).encode()
    writer.write(
        b"POST /api/chat/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    seen = b""
    try:
        while b"event: start" not in seen:
            chunk = await reader.read(4096)
            if not chunk:
                return
            seen += chunk
        started.append(time.monotonic())
        if len(started) == count:
            all_in.set()
        await release.wait()
    finally:
        writer.close()


async def _held_streams(port: int, count: int, deadline_s: float) -> tuple[int, float]:
    """Open `count` streams at once; how many got their `start` within the deadline, and when the
    last of those did (seconds from the first connection)."""
    started: list[float] = []
    release, all_in = asyncio.Event(), asyncio.Event()
    t0 = time.monotonic()
    tasks = [asyncio.create_task(_hold(port, started, release, all_in, count)) for _ in range(count)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_in.wait(), deadline_s)
    got, last = len(started), (max(started) - t0 if started else float("inf"))
    release.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return got, last


def test_one_worker_holds_1500_streams_at_once_by_default(tmp_path, fake: FakeUpstream) -> None:
    # Every stream gets its head and first delta at once, then nothing for a minute: held open.
    fake.behave("openai", deltas=["a", "b"], chunk_interval_s=60.0, count=None)
    srv = serve(tmp_path, fake)
    try:
        got, last = asyncio.run(_held_streams(srv.port, 1500, deadline_s=30))
    finally:
        stop_server(srv)
        fake.reset()
    assert got == 1500, f"only {got} of 1500 streams started (the last after {last:.1f} s)"


def test_past_max_concurrency_requests_wait(tmp_path, fake: FakeUpstream) -> None:
    fake.behave("openai", deltas=["a", "b"], chunk_interval_s=60.0, count=None)
    srv = serve(tmp_path, fake, MAX_CONCURRENCY="40")
    try:
        got, _ = asyncio.run(_held_streams(srv.port, 60, deadline_s=3))
    finally:
        stop_server(srv)
        fake.reset()
    assert got == 40  # the other 20 wait for a slot: they are not refused, nor served past the cap
