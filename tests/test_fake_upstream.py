"""The fake upstream checked against the official `openai` and `anthropic` SDKs, over real HTTP on 127.0.0.1.

What each SDK raises in each failure case is asserted as observed, so a change in an SDK shows up here first.
"""

from __future__ import annotations

import asyncio
import json
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import anthropic
import httpx
import httpx2
import openai
import pytest

from fake_upstream import FakeUpstream

HERE = Path(__file__).resolve().parent
USER = [{"role": "user", "content": "tell me a story"}]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeUpstream) -> Iterator[FakeUpstream]:
    """The shared fake, reset, once the connections of earlier tests are closed on its side too."""
    server.wait_for(lambda _: server.open_connections() == 0, timeout=2.0)
    server.reset()
    yield server
    server.reset()


def oai(fake: FakeUpstream, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        **{"api_key": fake.openai_key, "base_url": fake.openai_base_url, "max_retries": 0, **kw}
    )


def ant(fake: FakeUpstream, **kw) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        **{"api_key": fake.anthropic_key, "base_url": fake.anthropic_base_url, "max_retries": 0, **kw}
    )


def run(coro):
    return asyncio.run(coro)


def wire_events(raw: bytes) -> list[dict[str, str]]:
    """Split an event stream into events, asserting the framing: `\\n` line ends, a blank line ends each."""
    assert b"\r" not in raw
    assert raw.endswith(b"\n\n"), raw[-80:]
    events = []
    for block in raw[:-2].split(b"\n\n"):
        fields = {}
        for line in block.decode().split("\n"):
            name, sep, value = line.partition(": ")
            assert sep and name in ("event", "data") and name not in fields, line
            fields[name] = value
        events.append(fields)
    return events


# -- OpenAI ------------------------------------------------------------------------------------------------


def test_openai_non_streamed(fake: FakeUpstream) -> None:
    async def go():
        async with oai(fake) as client:
            return await client.chat.completions.create(model="gpt-4o-mini", messages=USER, max_tokens=50)

    r = run(go())
    assert r.object == "chat.completion" and r.model == "gpt-4o-mini" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Echo from openai: tell me a story"
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 7, 11)
    [rec] = fake.requests("openai")
    assert rec["path"] == "/v1/chat/completions" and rec["completed"] and not rec["client_gone"]
    assert rec["headers"]["authorization"] == "Bearer sk-test-openai"
    assert rec["body"]["messages"] == USER and rec["body"]["max_tokens"] == 50


def test_openai_streamed_with_usage(fake: FakeUpstream) -> None:
    fake.behave("openai", deltas=["Once", " upon", " a time"], input_tokens=9, output_tokens=41)

    async def go():
        async with oai(fake) as client:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=USER, stream=True, stream_options={"include_usage": True}
            )
            return [chunk async for chunk in stream]  # ends at [DONE]

    chunks = run(go())
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert [c.choices[0].delta.content for c in chunks[1:4]] == ["Once", " upon", " a time"]
    assert chunks[4].choices[0].finish_reason == "stop" and chunks[4].choices[0].delta.content is None
    assert chunks[5].choices == [] and chunks[5].usage.prompt_tokens == 9
    assert (chunks[5].usage.completion_tokens, chunks[5].usage.total_tokens) == (41, 50)
    assert len(chunks) == 6 and all(c.object == "chat.completion.chunk" for c in chunks)
    [rec] = fake.requests()
    assert rec["completed"] and rec["deltas_sent"] == 3 and rec["stream"]


def test_openai_stream_wire_format(fake: FakeUpstream) -> None:
    body = {"model": "m", "messages": USER, "stream": True}
    headers = {"authorization": "Bearer sk-test-openai"}
    with httpx.Client(trust_env=False) as client:
        r = client.post(fake.openai_base_url + "/chat/completions", json=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = wire_events(r.content)
    assert all(set(e) == {"data"} for e in events)
    assert events[-1]["data"] == "[DONE]"
    chunks = [json.loads(e["data"]) for e in events[:-1]]
    assert "usage" not in chunks[0]  # only with stream_options.include_usage
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == (
        "Echo from openai: tell me a story"
    )
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_openai_max_tokens_gives_length(fake: FakeUpstream) -> None:
    fake.behave("openai", chunks=10)

    async def go():
        async with oai(fake) as client:
            full = await client.chat.completions.create(model="m", messages=USER, max_completion_tokens=3)
            stream = await client.chat.completions.create(model="m", messages=USER, max_tokens=3, stream=True)
            return full, [c async for c in stream]

    full, chunks = run(go())
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 3
    assert full.choices[0].message.content == "Echo from openai:"
    assert len(chunks) == 5 and chunks[-1].choices[0].finish_reason == "length"


def test_openai_base_url_without_v1(fake: FakeUpstream) -> None:
    async def go():
        async with oai(fake, base_url=fake.url) as client:
            return await client.chat.completions.create(model="m", messages=USER)

    assert run(go()).choices[0].message.content.startswith("Echo from openai")
    assert fake.requests()[0]["path"] == "/chat/completions"


def test_openai_wrong_key(fake: FakeUpstream) -> None:
    async def go():
        async with oai(fake, api_key="sk-wrong") as client:
            await client.chat.completions.create(model="m", messages=USER)

    with pytest.raises(openai.AuthenticationError) as exc:
        run(go())
    assert exc.value.status_code == 401
    assert exc.value.body["code"] == "invalid_api_key" and exc.value.body["type"] == "invalid_request_error"


def test_openai_rate_limited_with_retry_after(fake: FakeUpstream) -> None:
    fake.behave("openai", status=429, retry_after=7, count=1)

    async def go():
        async with oai(fake) as client:
            await client.chat.completions.create(model="m", messages=USER)

    with pytest.raises(openai.RateLimitError) as exc:
        run(go())
    assert exc.value.response.headers["retry-after"] == "7"
    assert exc.value.body["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize("value", ["inf", "-5", "soon", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_retry_after_strings_are_sent_verbatim(fake: FakeUpstream, value: str) -> None:
    fake.behave("openai", status=429, retry_after=value, retry_after_ms="nan", count=1)
    body = {"model": "m", "messages": USER}
    headers = {"authorization": "Bearer sk-test-openai"}
    with httpx.Client(trust_env=False) as client:
        resp = client.post(fake.openai_base_url + "/chat/completions", json=body, headers=headers)
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == value and resp.headers["retry-after-ms"] == "nan"
    with pytest.raises(ValueError, match="retry_after"):
        fake.behave("openai", status=429, retry_after="1\r\nX-Injected: yes")


def test_openai_server_error(fake: FakeUpstream) -> None:
    fake.behave("openai", status=500)

    async def go():
        async with oai(fake) as client:
            await client.chat.completions.create(model="m", messages=USER)

    with pytest.raises(openai.InternalServerError) as exc:
        run(go())
    assert exc.value.status_code == 500 and exc.value.body["type"] == "server_error"


def test_openai_sdk_retries_hit_the_fake(fake: FakeUpstream) -> None:
    # retry-after-ms keeps the SDK's back-off short; the SDK honours it like retry-after
    fake.behave("openai", status=500, retry_after_ms=1)

    async def go():
        async with oai(fake, max_retries=2) as client:
            await client.chat.completions.create(model="m", messages=USER)

    with pytest.raises(openai.InternalServerError):
        run(go())
    recs = fake.requests("openai")
    assert len(recs) == 3
    assert [r["headers"]["x-stainless-retry-count"] for r in recs] == ["0", "1", "2"]


def test_count_limits_an_injection_to_the_next_requests(fake: FakeUpstream) -> None:
    fake.behave("openai", status=503, retry_after_ms=1, count=2)

    async def go():
        async with oai(fake, max_retries=2) as client:
            return await client.chat.completions.create(model="m", messages=USER)

    assert run(go()).choices[0].message.content.startswith("Echo")
    assert [r["status"] for r in fake.requests()] == [503, 503, 200]
    assert fake.stats()["queued"] == {"openai": 0, "anthropic": 0}


def test_openai_models_list(fake: FakeUpstream) -> None:
    async def go():
        async with oai(fake) as client:
            return [m.id async for m in client.models.list()]

    assert run(go()) == ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"]


def test_openai_in_stream_error_event(fake: FakeUpstream) -> None:
    fake.behave("openai", error_event_after=2)
    got: list[str] = []

    async def go():
        async with oai(fake) as client:
            stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
            async for c in stream:
                got.append(c.choices[0].delta.content)

    with pytest.raises(openai.APIError) as exc:
        run(go())
    assert type(exc.value) is openai.APIError  # not an APIStatusError: the status was 200
    assert exc.value.body["type"] == "server_error"
    assert got == ["", "Echo", " from"]


def test_malformed_json_raises_json_errors(fake: FakeUpstream) -> None:
    fake.behave("openai", malformed=True)
    fake.behave("anthropic", malformed=True, malformed_after=1)

    async def full():
        async with oai(fake) as client:
            await client.chat.completions.create(model="m", messages=USER)

    async def streamed():
        async with ant(fake) as client:
            stream = await client.messages.create(model="m", max_tokens=50, messages=USER, stream=True)
            async for _ in stream:
                pass

    with pytest.raises(json.JSONDecodeError):
        run(full())
    with pytest.raises(json.JSONDecodeError):
        run(streamed())
    assert [r["status"] for r in fake.requests()] == [200, 200]


# -- Anthropic ---------------------------------------------------------------------------------------------


def test_anthropic_non_streamed(fake: FakeUpstream) -> None:
    async def go():
        async with ant(fake) as client:
            return await client.messages.create(
                model="claude-test", max_tokens=100, system="be brief", messages=USER
            )

    m = run(go())
    assert m.type == "message" and m.role == "assistant" and m.model == "claude-test"
    assert m.content[0].type == "text" and m.content[0].text == "Echo from anthropic: tell me a story"
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert (m.usage.input_tokens, m.usage.output_tokens) == (6, 7)
    [rec] = fake.requests("anthropic")
    assert rec["path"] == "/v1/messages" and rec["headers"]["anthropic-version"]
    assert rec["body"]["system"] == "be brief"


def test_anthropic_messages_stream(fake: FakeUpstream) -> None:
    fake.behave("anthropic", deltas=["Once", " upon", " a time"], input_tokens=9, output_tokens=41)

    async def go():
        async with (
            ant(fake) as client,
            client.messages.stream(model="m", max_tokens=100, messages=USER) as stream,
        ):
            texts = [t async for t in stream.text_stream]
            return texts, await stream.get_final_message()

    texts, final = run(go())
    assert texts == ["Once", " upon", " a time"]
    assert final.content[0].text == "Once upon a time" and final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 41)


def test_anthropic_create_stream_events(fake: FakeUpstream) -> None:
    async def go():
        async with ant(fake) as client:
            stream = await client.messages.create(model="m", max_tokens=4, messages=USER, stream=True)
            return [e async for e in stream]

    events = run(go())
    types = [e.type for e in events]
    assert types == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the SDK skips `ping`
    assert events[0].message.usage.output_tokens == 1 and events[0].message.usage.input_tokens == 4
    assert "".join(e.delta.text for e in events[2:6]) == "Echo from anthropic: tell"
    assert events[7].delta.stop_reason == "max_tokens" and events[7].usage.output_tokens == 4


def test_anthropic_wire_format_and_x_api_key(fake: FakeUpstream) -> None:
    body = {"model": "m", "max_tokens": 100, "messages": USER, "stream": True}
    headers = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
    with httpx.Client(trust_env=False) as client:
        r = client.post(fake.url + "/v1/messages", json=body, headers=headers)
        no_version = client.post(fake.url + "/v1/messages", json=body, headers={"x-api-key": "sk-ant-test"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = wire_events(r.content)
    assert [e["event"] for e in events[:3]] == ["message_start", "content_block_start", "ping"]
    assert [e["event"] for e in events[-3:]] == ["content_block_stop", "message_delta", "message_stop"]
    for e in events:
        assert json.loads(e["data"])["type"] == e["event"]
    assert no_version.status_code == 400
    assert no_version.json()["error"]["type"] == "invalid_request_error"


def test_anthropic_in_stream_overloaded_error(fake: FakeUpstream) -> None:
    fake.behave("anthropic", error_event_after=2)
    got: list[str] = []

    async def go():
        async with (
            ant(fake) as client,
            client.messages.stream(model="m", max_tokens=100, messages=USER) as stream,
        ):
            async for text in stream.text_stream:
                got.append(text)

    with pytest.raises(anthropic.APIStatusError) as exc:
        run(go())
    # the event arrives on a 200 response, so the SDK raises the plain APIStatusError, not OverloadedError
    assert type(exc.value) is anthropic.APIStatusError and exc.value.status_code == 200
    assert exc.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert got == ["Echo", " from"]


def test_anthropic_wrong_key(fake: FakeUpstream) -> None:
    async def go():
        async with ant(fake, api_key="sk-ant-wrong") as client:
            await client.messages.create(model="m", max_tokens=10, messages=USER)

    with pytest.raises(anthropic.AuthenticationError) as exc:
        run(go())
    assert exc.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
    }


@pytest.mark.parametrize(
    ("status", "error", "etype"),
    [
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
        (400, anthropic.BadRequestError, "invalid_request_error"),
    ],
)
def test_anthropic_error_statuses(fake: FakeUpstream, status: int, error: type, etype: str) -> None:
    fake.behave("anthropic", status=status, retry_after=3, count=1)

    async def go():
        async with ant(fake) as client:
            await client.messages.create(model="m", max_tokens=10, messages=USER)

    with pytest.raises(error) as exc:
        run(go())
    assert exc.value.status_code == status and exc.value.type == etype
    assert exc.value.response.headers["retry-after"] == "3"
    assert exc.value.request_id == exc.value.body["request_id"]


def test_openai_refuses_stream_options_without_stream(fake: FakeUpstream) -> None:
    async def go():
        async with oai(fake) as client:
            opts = {"include_usage": True}
            await client.chat.completions.create(model="m", messages=USER, stream_options=opts)

    with pytest.raises(openai.BadRequestError):
        run(go())
    assert fake.requests()[0]["behaviour"] is None  # refused before any behaviour was used


def test_anthropic_refuses_a_system_role_message(fake: FakeUpstream) -> None:
    async def go():
        async with ant(fake) as client:
            msgs = [{"role": "system", "content": "x"}, *USER]
            await client.messages.create(model="m", max_tokens=10, messages=msgs)

    with pytest.raises(anthropic.BadRequestError):
        run(go())


def test_anthropic_models_list(fake: FakeUpstream) -> None:
    async def go():
        async with ant(fake) as client:
            return [m.id async for m in client.models.list()]

    assert run(go())[0] == "claude-sonnet-4-5"


# -- failure injection -------------------------------------------------------------------------------------


def test_head_delay(fake: FakeUpstream) -> None:
    fake.behave("openai", head_delay_s=0.3)

    async def go():
        async with oai(fake) as client:
            t0 = time.monotonic()
            raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER)
            return time.monotonic() - t0, raw

    elapsed, raw = run(go())
    assert elapsed >= 0.3
    rec = fake.requests()[0]
    assert rec["head_sent_at"] - rec["received_at"] >= 0.3
    assert raw.parse().choices[0].message.content.startswith("Echo")


def test_chunk_interval(fake: FakeUpstream) -> None:
    fake.behave("anthropic", chunks=4, chunk_interval_s=0.05)

    async def go():
        async with ant(fake) as client:
            t0 = time.monotonic()
            stream = await client.messages.create(model="m", max_tokens=100, messages=USER, stream=True)
            arrivals = [time.monotonic() - t0 async for e in stream if e.type == "content_block_delta"]
            return arrivals

    arrivals = run(go())
    assert len(arrivals) == 4 and arrivals[-1] >= 0.2
    rec = fake.requests()[0]
    assert rec["finished_at"] - rec["head_sent_at"] >= 0.2 and rec["deltas_sent"] == 4


def test_body_pause_sends_the_head_then_stalls_half_way(fake: FakeUpstream) -> None:
    fake.behave("anthropic", deltas=["a whole ", "answer"], body_pause_s=0.4)
    body = {"model": "m", "max_tokens": 10, "messages": USER}
    headers = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
    with (
        httpx.Client(trust_env=False) as client,
        client.stream("POST", fake.anthropic_base_url + "/v1/messages", json=body, headers=headers) as resp,
    ):
        t0 = time.monotonic()
        assert resp.headers["transfer-encoding"] == "chunked"
        raw = resp.iter_raw()
        first = next(raw)
        assert time.monotonic() - t0 < 0.3  # half the body came with the head
        rest = b"".join(raw)
        assert time.monotonic() - t0 >= 0.4
    assert json.loads(first + rest)["content"][0]["text"] == "a whole answer"
    [rec] = fake.requests("anthropic")
    assert rec["completed"] and rec["finished_at"] - rec["head_sent_at"] >= 0.4


def test_a_client_leaving_a_paused_body_is_gone(fake: FakeUpstream) -> None:
    fake.behave("openai", body_pause_s=30)
    body = {"model": "m", "messages": USER}
    headers = {"authorization": "Bearer sk-test-openai"}
    with (
        httpx.Client(trust_env=False) as client,
        client.stream("POST", fake.openai_base_url + "/chat/completions", json=body, headers=headers) as resp,
    ):
        next(resp.iter_raw())
    left_at = time.monotonic()
    [rec] = fake.wait_for(lambda recs: [r for r in recs if r["client_gone"]], timeout=2.0)
    assert rec["gone_at"] - left_at < 1.0 and not rec["completed"]


def test_drop_after_openai(fake: FakeUpstream) -> None:
    fake.behave("openai", drop_after=3, chunks=10)
    got: list[str | None] = []

    async def go():
        async with oai(fake) as client:
            stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
            async for c in stream:
                got.append(c.choices[0].delta.content)

    with pytest.raises(openai.APIConnectionError) as exc:
        run(go())
    assert isinstance(exc.value.__cause__, httpx2.RemoteProtocolError)
    assert got == ["", "Echo", " from", " openai:"]
    rec = fake.requests()[0]
    assert rec["dropped"] and not rec["completed"] and rec["deltas_sent"] == 3


def test_drop_after_anthropic(fake: FakeUpstream) -> None:
    fake.behave("anthropic", drop_after=2)
    got: list[str] = []

    async def go():
        async with (
            ant(fake) as client,
            client.messages.stream(model="m", max_tokens=100, messages=USER) as stream,
        ):
            async for text in stream.text_stream:
                got.append(text)

    # the anthropic SDK does not wrap transport errors raised while iterating a stream
    with pytest.raises(httpx2.RemoteProtocolError):
        run(go())
    assert got == ["Echo", " from"]


def test_drop_after_non_streamed(fake: FakeUpstream) -> None:
    fake.behave("openai", drop_after=0)

    async def go():
        async with oai(fake) as client:
            await client.chat.completions.create(model="m", messages=USER)

    with pytest.raises(openai.APIConnectionError):
        run(go())


async def _leave_via_sdk(fake: FakeUpstream) -> None:
    async with oai(fake) as client:
        stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.close()


async def _leave_via_httpx(fake: FakeUpstream) -> None:
    body = {"model": "m", "messages": USER, "stream": True}
    headers = {"authorization": "Bearer sk-test-openai"}
    url = fake.openai_base_url + "/chat/completions"
    async with (
        httpx.AsyncClient(trust_env=False) as client,
        client.stream("POST", url, json=body, headers=headers) as resp,
    ):
        async for line in resp.aiter_lines():
            if '"content":"Echo"' in line:
                break


@pytest.mark.parametrize("leave", [_leave_via_sdk, _leave_via_httpx], ids=["openai-sdk", "httpx"])
def test_client_gone_mid_stream(fake: FakeUpstream, leave) -> None:
    fake.behave("openai", chunks=1000, chunk_interval_s=0.05)

    async def go():
        await leave(fake)
        return time.monotonic()

    closed_at = run(go())
    [rec] = fake.wait_for(lambda recs: [r for r in recs if r["client_gone"]], timeout=1.0)
    assert rec["gone_at"] - closed_at < 1.0 and not rec["completed"]
    assert rec["deltas_sent"] < 40  # the fake stopped generating when the reader left
    fake.wait_for(lambda _: fake.open_connections() == 0, timeout=1.0)


def test_client_gone_aiohttp_mid_stream(fake: FakeUpstream) -> None:
    fake.behave("anthropic", chunks=1000, chunk_interval_s=0.05)
    body = {"model": "m", "max_tokens": 5000, "messages": USER, "stream": True}
    headers = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}

    async def go():
        async with (
            aiohttp.ClientSession() as session,
            session.post(fake.url + "/v1/messages", json=body, headers=headers) as resp,
        ):
            await resp.content.readuntil(b"event: content_block_delta")
        return time.monotonic()

    closed_at = run(go())
    [rec] = fake.wait_for(lambda recs: [r for r in recs if r["client_gone"]], timeout=1.0)
    assert rec["gone_at"] - closed_at < 1.0


def test_client_gone_while_waiting_for_the_head(fake: FakeUpstream) -> None:
    # the handler is asleep in head_delay_s: only handler cancellation can notice the client leaving
    fake.behave("openai", head_delay_s=30)

    async def go():
        async with oai(fake, timeout=0.2) as client:
            with pytest.raises(openai.APITimeoutError):
                await client.chat.completions.create(model="m", messages=USER)
        return time.monotonic()

    gave_up_at = run(go())
    [rec] = fake.wait_for(lambda recs: [r for r in recs if r["client_gone"]], timeout=1.0)
    assert rec["gone_at"] - gave_up_at < 1.0 and rec["head_sent_at"] is None
    assert fake.stats()["in_flight"] == 0


def test_open_connections_follow_the_clients(fake: FakeUpstream) -> None:
    async def go():
        clients = [oai(fake) for _ in range(3)]
        for client in clients:  # keep-alive: each client keeps its one connection in its pool
            for _ in range(2):
                stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
                [c async for c in stream]
        open_while_pooled = fake.open_connections()
        for client in clients:
            await client.close()
        return open_while_pooled

    assert run(go()) == 3
    fake.wait_for(lambda _: fake.open_connections() == 0, timeout=1.0)
    assert len(fake.requests()) == 6 and all(r["completed"] for r in fake.requests())


def test_many_concurrent_streams(fake: FakeUpstream) -> None:
    fake.behave("openai", chunks=20, chunk_interval_s=0.01)
    body = {"model": "m", "messages": USER, "stream": True}
    headers = {"authorization": "Bearer sk-test-openai"}
    n = 300

    async def one(session: aiohttp.ClientSession) -> int:
        async with session.post(fake.openai_base_url + "/chat/completions", json=body, headers=headers) as r:
            raw = await r.read()
        return raw.count(b"data: ")

    async def go():
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            return await asyncio.gather(*(one(session) for _ in range(n)))

    assert run(go()) == [23] * n  # role chunk, 20 deltas, finish chunk, [DONE]
    assert fake.stats()["totals"]["completed"] == n


# -- omit_usage: servers that do not count ------------------------------------------------------------------


def test_openai_omit_usage(fake: FakeUpstream) -> None:
    """No `usage` in the body, and no usage chunk in the stream even though include_usage asked for one."""
    fake.behave("openai", deltas=["Once", " upon", " a time"], omit_usage=True)

    async def go():
        async with oai(fake) as client:
            full = await client.chat.completions.create(model="m", messages=USER)
            stream = await client.chat.completions.create(
                model="m", messages=USER, stream=True, stream_options={"include_usage": True}
            )
            return full, [chunk async for chunk in stream]

    full, chunks = run(go())
    assert full.choices[0].message.content == "Once upon a time" and full.usage is None
    assert [c.choices[0].delta.content for c in chunks] == ["", "Once", " upon", " a time", None]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    body = {"model": "m", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"authorization": "Bearer sk-test-openai"}
    with httpx.Client(trust_env=False) as client:
        r = client.post(fake.openai_base_url + "/chat/completions", json=body, headers=headers)
        whole = client.post(
            fake.openai_base_url + "/chat/completions", json={"model": "m", "messages": USER}, headers=headers
        )
    events = wire_events(r.content)
    assert events[-1]["data"] == "[DONE]"
    assert not any("usage" in json.loads(e["data"]) for e in events[:-1])
    assert "usage" not in whole.json()


def test_anthropic_omit_usage(fake: FakeUpstream) -> None:
    """The usage fields the SDK requires, all 0: in the body, in message_start and in message_delta."""
    fake.behave("anthropic", deltas=["Once", " upon", " a time"], omit_usage=True)

    async def go():
        async with ant(fake) as client:
            full = await client.messages.create(model="m", max_tokens=100, messages=USER)
            stream = await client.messages.create(model="m", max_tokens=100, messages=USER, stream=True)
            return full, [e async for e in stream]

    full, events = run(go())
    assert full.content[0].text == "Once upon a time"
    assert (full.usage.input_tokens, full.usage.output_tokens) == (0, 0)
    assert events[0].type == "message_start"
    assert (events[0].message.usage.input_tokens, events[0].message.usage.output_tokens) == (0, 0)
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == "Once upon a time"
    [delta] = [e for e in events if e.type == "message_delta"]
    assert delta.delta.stop_reason == "end_turn" and delta.usage.output_tokens == 0


def test_behaviour_validation_and_reset(fake: FakeUpstream) -> None:
    with pytest.raises(ValueError, match="unknown behaviour parameter"):
        fake.behave("openai", stauts=500)
    with pytest.raises(ValueError, match="status"):
        fake.behave("openai", status=200)
    with pytest.raises(ValueError, match="provider"):
        fake.behave("gemini", status=500)
    with pytest.raises(ValueError, match="omit_usage must be bool"):
        fake.behave("openai", omit_usage=1)
    fake.behave("anthropic", status=500)
    fake.reset()

    async def go():
        async with ant(fake) as client:
            return await client.messages.create(model="m", max_tokens=10, messages=USER)

    assert run(go()).stop_reason == "end_turn"


# -- as its own process ------------------------------------------------------------------------------------


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of the child's stdout, with a deadline (the child might never print it)."""
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError(f"no line from the fake within {timeout} s: {buf!r}")
            chunk = proc.stdout.read1(4096)
            if not chunk:
                raise RuntimeError(f"the fake exited: {buf!r}")
            buf += chunk
    return buf.decode().strip()


def test_as_a_subprocess() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "fake_upstream.py"), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
    )
    try:
        word, url = read_line(proc, timeout=15).split()
        assert word == "LISTENING" and url.startswith("http://127.0.0.1:")
        remote = FakeUpstream.connect(url)
        remote.behave("openai", deltas=["from", " afar"])
        client = openai.OpenAI(api_key="sk-test-openai", base_url=remote.openai_base_url, max_retries=0)
        with client:
            r = client.chat.completions.create(model="m", messages=USER)
        assert r.choices[0].message.content == "from afar"
        assert [rec["path"] for rec in remote.requests("openai")] == ["/v1/chat/completions"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
