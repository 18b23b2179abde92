"""The shared provider path (pwachat/providers/http_provider.py) against a scripted raw server:
what becomes of the connection when a whole answer is given up on, the bounds on a stream's
length and duration, and which provider `Retry-After` values are passed on.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time

import pytest

from pwachat.providers import http_provider
from pwachat.providers.base import ChatInput, UpstreamError, UpstreamRateLimited
from pwachat.providers.http_provider import error_for_status, retry_after_s
from pwachat.providers.openai import OpenAIProvider
from pwachat.settings import Settings
from raw_server import Handler, Server, hold, until

CHAT = ChatInput(model="m", system="s", history=[], message="hi", temperature=0.5, max_tokens=10)
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def provider(srv: Server) -> OpenAIProvider:
    return OpenAIProvider(Settings(upstream_max_retries=0), base_url=srv.url, headers={})


def delta_frame(text: str) -> bytes:
    event = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
    data = b"data: " + json.dumps(event).encode() + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(data), data)


def endless(frame: bytes, interval_s: float, sent: list[int], gone: list[float]) -> Handler:
    """A stream head, then `frame` every `interval_s` (0: as fast as the client reads) until the
    client hangs up; `sent` counts the bytes written, `gone` gets the time the client left."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(STREAM_HEAD)
        try:
            while True:
                writer.write(frame)
                sent[0] += len(frame)
                await writer.drain()
                await asyncio.sleep(interval_s)  # pacing the stream (0: let the client run)
        except ConnectionError:
            gone.append(time.monotonic())
        return False

    return handler


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# complete(): a whole answer given up on closes its connection


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_complete_given_up_mid_body_hangs_up_on_the_provider(how: str) -> None:
    # /api/chat wraps complete() in asyncio.timeout(UPSTREAM_TIMEOUT_S); after its 504 the provider
    # must see the request go, not be read to its end in the background.
    async def main() -> None:
        gone: list[float] = []
        written: list[float] = []
        head = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nc\r\n{"choices": \r\n'
        async with Server(hold(head, gone=gone, written=written)) as srv:
            p = provider(srv)
            if how == "timeout":
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.3):
                        await p.complete(CHAT)
            else:
                task = asyncio.ensure_future(p.complete(CHAT))
                # Cancelled waiting for the rest of the body or, on a slow day, still for the head:
                # either way the connection must close.
                await until(lambda: written, 5, "the server wrote the head and half the body")
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            gave_up = time.monotonic()
            await until(lambda: gone, 1.0, "the provider saw the connection close")
            assert gone[0] - gave_up < 1.0
            assert not p.http.pool._idle
            await p.aclose()

    run(main())


def test_complete_still_pools_a_whole_answer() -> None:
    async def main() -> None:
        body = json.dumps({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}).encode()
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
            writer.write(ok)
            await writer.drain()
            return True

        async with Server(handler) as srv:
            p = provider(srv)
            for _ in range(3):
                assert (await p.complete(CHAT)).text == "ok"
            assert srv.connections == 1
            await p.aclose()

    run(main())


# --------------------------------------------------------------------------------------------
# A stream's total bytes and duration are bounded


def test_a_stream_past_the_byte_cap_ends_with_upstream_error_and_hangs_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cap = 64 * 1024
    monkeypatch.setattr(http_provider, "MAX_STREAM_BYTES", cap, raising=False)

    async def main() -> None:
        sent, gone = [0], []
        async with Server(endless(delta_frame("x" * 100), 0, sent, gone)) as srv:
            p = provider(srv)
            stream = await p.open_stream(CHAT)
            got = 0
            with pytest.raises(UpstreamError) as exc:
                async with asyncio.timeout(10):
                    while True:
                        got += sum(map(len, await stream.next()))
            assert exc.value.code == "upstream_error" and not stream.finished
            assert 0 < got <= cap
            ended = time.monotonic()
            await until(lambda: gone, 1.0, "the provider saw the connection close")
            assert gone[0] - ended < 1.0
            await stream.aclose()
            await p.aclose()

    run(main())


def test_a_stream_past_its_duration_cap_ends_with_upstream_error_and_hangs_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_provider, "MAX_STREAM_S", 0.5, raising=False)

    async def main() -> None:
        sent, gone = [0], []
        async with Server(endless(delta_frame("tick"), 0.02, sent, gone)) as srv:
            p = provider(srv)
            opened = time.monotonic()
            stream = await p.open_stream(CHAT)
            deltas = []
            with pytest.raises(UpstreamError) as exc:
                async with asyncio.timeout(10):
                    while True:
                        deltas += await stream.next()
            ended = time.monotonic()
            assert exc.value.code == "upstream_error" and deltas
            assert 0.5 <= ended - opened < 3.0
            await until(lambda: gone, 1.0, "the provider saw the connection close")
            assert gone[0] - ended < 1.0
            await stream.aclose()
            await p.aclose()

    run(main())


def test_the_stream_bounds_are_sane_defaults() -> None:
    assert http_provider.MAX_STREAM_BYTES >= 16 * 1024 * 1024  # far beyond any real answer
    assert 10 * 60 <= http_provider.MAX_STREAM_S <= 2 * 3600


# --------------------------------------------------------------------------------------------
# Retry-After: a finite number of seconds (or an HTTP date) within 0..3600, else the default


def http_date(offset_s: float) -> str:
    return email.utils.formatdate(time.time() + offset_s, usegmt=True)


UNUSABLE_SECONDS = [
    "inf",
    "-inf",
    "Infinity",
    "nan",
    "1e999",
    "-5",
    "3601",
    "99999999999",
    "soon",
    "",
    "7, 8",
    "+2h",  # a real date (made when the test runs), but further ahead than any wait passed on
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "Mon, 32 Foo 2020 99:99:99 GMT",
    "Sat, 01 Jan 0001 00:00:00 GMT",
]
UNUSABLE_MS = ["inf", "nan", "1e999", "-5000", "3600001", "99999999999999", "soon", ""]


@pytest.mark.parametrize(
    ("name", "value"),
    [("retry-after", v) for v in UNUSABLE_SECONDS] + [("retry-after-ms", v) for v in UNUSABLE_MS],
)
def test_an_unusable_retry_after_is_replaced_by_the_default(name: str, value: str) -> None:
    if value == "+2h":
        value = http_date(2 * 3600)
    err = error_for_status("OpenAI", 429, {name: value})
    assert isinstance(err, UpstreamRateLimited) and err.status == 503
    default = http_provider.DEFAULT_RETRY_AFTER_S
    assert isinstance(default, int) and 1 <= default <= 3600
    assert err.retry_after == default
    assert err.headers["Retry-After"] == str(default)
    assert retry_after_s({name: value}) is None  # and the retry loop backs off on its own


@pytest.mark.parametrize(
    ("headers", "want"),
    [
        ({"retry-after": "7"}, 7),
        ({"retry-after": " 7 "}, 7),
        ({"retry-after": "0"}, 1),
        ({"retry-after": "2.5"}, 3),
        ({"retry-after": "3600"}, 3600),
        ({"retry-after-ms": "2500"}, 3),
        ({"retry-after-ms": "nan", "retry-after": "7"}, 7),
        ({"retry-after": http_date(-30)}, 1),  # a date just past: now (clock skew)
    ],
)
def test_a_usable_retry_after_is_passed_on_in_whole_seconds(headers: dict[str, str], want: int) -> None:
    err = error_for_status("OpenAI", 429, headers)
    assert isinstance(err, UpstreamRateLimited)
    assert err.retry_after == want and err.headers["Retry-After"] == str(want)


def test_an_http_date_retry_after_within_the_hour_is_passed_on() -> None:
    err = error_for_status("OpenAI", 429, {"retry-after": http_date(120)})
    assert isinstance(err, UpstreamRateLimited)
    assert err.retry_after is not None and 115 <= err.retry_after <= 121


def test_no_retry_after_is_none_passed_on() -> None:
    err = error_for_status("OpenAI", 429, {})
    assert isinstance(err, UpstreamRateLimited)
    assert err.retry_after is None and "Retry-After" not in err.headers


def test_retries_after_an_unusable_retry_after_back_off_and_end_in_a_503() -> None:
    async def main() -> None:
        limited = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: inf\r\nContent-Length: 2\r\n\r\n{}"

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
            writer.write(limited)
            await writer.drain()
            return True

        async with Server(handler) as srv:
            p = OpenAIProvider(Settings(upstream_max_retries=1), base_url=srv.url, headers={})
            with pytest.raises(UpstreamRateLimited) as exc:
                async with asyncio.timeout(10):
                    await p.complete(CHAT)
            assert exc.value.retry_after == http_provider.DEFAULT_RETRY_AFTER_S
            assert len(srv.requests) == 2
            await p.aclose()

    run(main())
