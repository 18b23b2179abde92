"""The stream log's own rules (pwachat/streams.py), in-process: where a resume picks up inside a
flush, the memory cap on ended streams, the bound on one stream's log, the grace's timer."""

from __future__ import annotations

import asyncio

from pwachat._native import SseEncoder
from pwachat.settings import Settings
from pwachat.streams import Streams, cut_after


def flushes(enc: SseEncoder, sizes: list[int]) -> list[tuple[bytes, int]]:
    """Chunks as the relay flushes them: `start` with the first deltas, then batches of deltas."""
    out = []
    for i, n in enumerate(sizes):
        body = enc.event("start", b"{}") if i == 0 else b""
        body += enc.deltas([f"t{enc.next_id + k}" for k in range(n)]) if n else b""
        out.append((body, enc.next_id - 1))
    return out


def test_a_resume_inside_a_flush_gets_exactly_the_events_after_its_id() -> None:
    async def main() -> None:
        streams = Streams(Settings())
        log = streams.open("chat_x", "ip:1", lambda: None)
        enc = SseEncoder()
        for body, last in flushes(enc, [2, 3, 1, 4]):
            log.append(body, last, False)
        whole = bytes(log.buf)
        for after in range(-1, enc.next_id):
            got = whole[log.after(after) :]
            at = whole.find(b"id: %d\n" % (after + 1)) if after + 1 < enc.next_id else len(whole)
            assert got == whole[at:], after

    asyncio.run(main())


def test_cut_after_finds_the_id_line_only_at_an_event_start() -> None:
    enc = SseEncoder(5)
    chunk = enc.deltas(["id: 6\n is not a line here", "b"]) + b": ping\n\n" + enc.deltas(["c"])
    assert cut_after(chunk, 5).startswith(b'id: 6\nevent: delta\ndata: {"content":"b"}')
    assert cut_after(chunk, 6) == b'id: 7\nevent: delta\ndata: {"content":"c"}\n\n'


def test_ended_streams_past_the_memory_cap_are_forgotten_oldest_first() -> None:
    async def main() -> None:
        streams = Streams(Settings(stream_memory_mb=1, stream_retain_s=3600))
        big = b"x" * (300 * 1024)
        for i in range(5):
            log = streams.open(f"chat_{i}", "ip:1", lambda: None)
            log.append(big, 0, True)
        assert streams.retained_bytes <= 1024 * 1024
        assert [streams.get(f"chat_{i}", "ip:1") is not None for i in range(5)] == [
            False,
            False,
            True,
            True,
            True,
        ]
        assert streams.get("chat_4", "ip:2") is None  # another caller's

    asyncio.run(main())


def test_a_log_past_what_max_tokens_can_produce_ends_the_generation() -> None:
    async def main() -> None:
        cancelled = []
        streams = Streams(Settings(max_tokens=10))
        log = streams.open("chat_big", "ip:1", lambda: cancelled.append(True))
        chunk = b"y" * 1024
        for i in range(streams.max_log_bytes // len(chunk) + 1):
            log.append(chunk, i, False)
        assert cancelled == [True] and log.stop_reason == "too_long"

    asyncio.run(main())


def test_the_grace_starts_with_the_last_reader_gone_and_a_reader_back_cancels_it() -> None:
    async def main() -> None:
        cancelled: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        streams = Streams(Settings(stream_grace_s=0.05))
        log = streams.open("chat_g", "ip:1", lambda: cancelled.set_result(log.stop_reason or ""))
        log.reader_came()  # a resume attached: two readers
        log.reader_left()
        assert log.grace_timer is None  # one reader left
        log.reader_left()
        assert log.grace_timer is not None
        log.reader_came()
        assert log.grace_timer is None
        log.reader_left()
        assert not cancelled.done()
        assert await asyncio.wait_for(cancelled, 2) == "grace_expired"

    asyncio.run(main())


def test_with_no_grace_the_last_reader_leaving_cancels_at_once_and_stop_is_idempotent() -> None:
    async def main() -> None:
        cancelled = []
        streams = Streams(Settings(stream_grace_s=0))
        log = streams.open("chat_0", "ip:1", lambda: cancelled.append(log.stop_reason))
        log.reader_left()
        assert cancelled == ["reader_gone"]
        other = streams.open("chat_1", "ip:1", lambda: cancelled.append(other.stop_reason))
        assert other.stop() is True
        other.append(b"", 0, True)
        assert other.stop() is False and cancelled == ["reader_gone", "stopped"]

    asyncio.run(main())
