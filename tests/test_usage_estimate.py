"""Honest usage: when a provider reports no token counts, the server counts them itself.

The estimate (rust/src/usage.rs) against a pure-Python reference, the stream parser's own count of
what it hands out, then end to end: `pwachat serve` against the fake upstream's `omit_usage` (and
partial counts, and a stream that breaks), for both wire formats, `/api/chat` and the stream, the
answer and its access log line.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fake_upstream import FakeUpstream
from pwachat._native import UpstreamParser, estimate_input_tokens, estimate_output_tokens
from reference import anthropic_stream, openai_stream, parse_sse
from server import Server, access_line, read_all, split_response, sse_request, start_server, stop_server

# --------------------------------------------------------------------------------------------
# The estimate, against its reference
# --------------------------------------------------------------------------------------------

MESSAGE_OVERHEAD = 8  # a chat template's role header and separators, per message
REQUEST_OVERHEAD = 32  # begin-of-text, the reply's header, a template's own preamble
ANSWER_OVERHEAD = 2  # the end-of-turn token, a leading piece that decodes to nothing


def reference_input(system: str, history: list[tuple[str, str]], message: str) -> int:
    texts = [system, *(content for _, content in history), message]
    return sum(len(t.encode()) + MESSAGE_OVERHEAD for t in texts) + REQUEST_OVERHEAD


def reference_output(text: str) -> int:
    return len(text.encode()) + ANSWER_OVERHEAD


# Any text a request may hold (no lone surrogates: sanitising refuses them), multi-byte over-represented.
texts = st.lists(
    st.one_of(st.characters(codec="utf-8"), st.sampled_from(["é", "€", "😀", "ﷺ", "\n", " "])), max_size=40
).map("".join)
roles = st.sampled_from(["user", "assistant"])


@given(system=texts, history=st.lists(st.tuples(roles, texts), max_size=6), message=texts)
def test_input_estimate_is_the_utf8_bytes_plus_the_template_allowances(
    system: str, history: list[tuple[str, str]], message: str
) -> None:
    got = estimate_input_tokens(system, history, message)
    assert got == reference_input(system, history, message)
    # Never below the code points (a character is at least one byte, so at least one token's worth).
    assert got >= len(system) + len(message) + sum(len(c) for _, c in history)


@given(text=texts)
def test_output_estimate_is_the_utf8_bytes_plus_the_end_of_turn(text: str) -> None:
    assert estimate_output_tokens(text) == reference_output(text)


def test_history_items_must_be_role_content_tuples() -> None:
    assert estimate_input_tokens("", [], "") == 2 * MESSAGE_OVERHEAD + REQUEST_OVERHEAD
    with pytest.raises(TypeError):
        estimate_input_tokens("s", ["user: hi"], "m")  # type: ignore[list-item]
    with pytest.raises(TypeError):
        estimate_input_tokens("s", [("user", 5)], "m")  # type: ignore[list-item]


@given(
    deltas=st.lists(texts.filter(bool), max_size=8),
    kind=st.sampled_from(["openai", "anthropic"]),
    cuts=st.lists(st.integers(0, 10**6), max_size=8),
)
def test_the_parser_counts_the_bytes_it_hands_out_however_the_stream_is_split(
    deltas: list[str], kind: str, cuts: list[int]
) -> None:
    body = openai_stream(deltas, usage=(3, 4)) if kind == "openai" else anthropic_stream(deltas)
    parser = UpstreamParser(kind)
    got: list[str] = []
    start = 0
    for cut in [*sorted(c % (len(body) + 1) for c in cuts), len(body)]:
        got += parser.feed(body[start:cut])
        start = cut
    assert got == deltas
    assert parser.estimated_output_tokens == estimate_output_tokens("".join(deltas))
    assert parser.output_final


def test_output_counts_are_final_only_where_a_provider_puts_its_final_one() -> None:
    parser = UpstreamParser("openai")
    parser.feed(openai_stream(["Once", " upon"], usage=None))  # no usage chunk: nothing was counted
    assert parser.done and (parser.output_tokens, parser.output_final) == (0, False)
    parser = UpstreamParser("anthropic")
    whole = anthropic_stream(["Once", " upon"], usage=(25, 15))
    parser.feed(whole[: whole.index(b"event: message_delta")])  # broken before message_delta
    # message_start's output_tokens is a placeholder written before the answer.
    assert (parser.input_tokens, parser.output_tokens, parser.output_final) == (25, 1, False)
    parser.feed(whole[whole.index(b"event: message_delta") :])
    assert (parser.output_tokens, parser.output_final) == (15, True)


# --------------------------------------------------------------------------------------------
# End to end: the real server, the fake upstream
# --------------------------------------------------------------------------------------------

OPENAI_KEY = "sk-test-openai"
ANTHROPIC_KEY = "sk-ant-test"
SYSTEM_PROMPT = "Réponds brièvement."
UPSTREAM = {"openai": "openai", "claude": "anthropic"}  # our provider name -> the fake's
ENDPOINTS = ("/api/chat", "/api/chat/stream")
HISTORY = [
    {"role": "user", "content": "Combien coûte un café ?"},
    {"role": "assistant", "content": "Environ 2 € 😀"},
]
MESSAGE = "Et un croissant ?"
ANSWER = ["Un ", "croissant ", "coûte ", "1,20 € ", "🥐"]  # 5 deltas, multi-byte text


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(OPENAI_KEY, ANTHROPIC_KEY) as fake:
        yield fake


@pytest.fixture
def fake(upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    """The shared fake, reset before and after each test."""
    upstream.reset()
    yield upstream
    upstream.reset()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("usage"),
        OPENAI_API_KEY=OPENAI_KEY,
        OPENAI_BASE_URL=upstream.openai_base_url,
        ANTHROPIC_API_KEY=ANTHROPIC_KEY,
        ANTHROPIC_BASE_URL=upstream.anthropic_base_url,
        SYSTEM_PROMPT=SYSTEM_PROMPT,
        UPSTREAM_MAX_RETRIES="0",
        WORKERS="1",
        RATELIMIT_PER_MINUTE="100000",
        RATELIMIT_PER_HOUR="100000",
        RATELIMIT_PER_DAY="100000",
    )
    yield server
    stop_server(server)


def payload(provider: str) -> dict[str, Any]:
    return {"message": MESSAGE, "provider": provider, "history": HISTORY}


def ask(srv: Server, endpoint: str, provider: str) -> tuple[dict[str, Any], bytes, str, str]:
    """One request; returns (the answer's terminal payload, its raw bytes, the text, the request id).
    For the stream, the terminal payload is the `done` (or `error`) event's data."""
    request_id = f"usage-{uuid.uuid4().hex}"
    body = json.dumps(payload(provider)).encode()
    if endpoint == "/api/chat":
        status, _, raw = srv.post_json(endpoint, payload(provider), **{"X-Request-ID": request_id})
        assert status == 200, raw
        answer = json.loads(raw)
        return answer, raw, answer["response"], request_id
    with sse_request(srv.port, body, f"X-Request-ID: {request_id}\r\n") as sock:
        status, _, raw = split_response(read_all(sock))
    assert status == 200, raw
    events, _ = parse_sse(raw)
    assert events[0].type == "start" and events[-1].type in ("done", "error"), events
    text = "".join(json.loads(e.data)["content"] for e in events if e.type == "delta")
    return json.loads(events[-1].data), raw.split(b"\n\n")[-2], text, request_id


def sent(fake: FakeUpstream, upstream: str) -> tuple[str, list[tuple[str, str]], str]:
    """What the provider was sent, as (system prompt, history, message), read from the fake's record."""
    records = fake.requests(upstream)
    assert len(records) == 1, records
    body = records[0]["body"]
    messages = body["messages"]
    if upstream == "openai":
        system, messages = messages[0]["content"], messages[1:]
    else:
        system = body["system"]
    *history, last = messages
    return system, [(m["role"], m["content"]) for m in history], last["content"]


@pytest.mark.e2e
@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("provider", list(UPSTREAM))
def test_no_usage_from_the_provider_is_counted_by_the_server_and_marked_estimated(
    srv: Server, fake: FakeUpstream, provider: str, endpoint: str
) -> None:
    upstream = UPSTREAM[provider]
    fake.behave(upstream, deltas=ANSWER, omit_usage=True)
    answer, raw, text, request_id = ask(srv, endpoint, provider)
    assert text == "".join(ANSWER)
    system, history, message = sent(fake, upstream)
    assert (system, message) == (SYSTEM_PROMPT, MESSAGE)
    # Input from what was sent, output from what was relayed; both an upper bound.
    expected = {
        "input_tokens": estimate_input_tokens(system, history, message),
        "output_tokens": estimate_output_tokens(text),
        "estimated": True,
    }
    assert answer["usage"] == expected
    assert b'"estimated":true}' in raw  # the last member of the usage object
    line = access_line(srv, request_id)
    assert (line["input_tokens"], line["output_tokens"], line["usage_estimated"]) == (
        expected["input_tokens"],
        expected["output_tokens"],
        True,
    )

    # The same request counted by the fake itself (words): the estimate is never below it.
    fake.reset()
    fake.behave(upstream, deltas=ANSWER)
    counted, raw, _, request_id = ask(srv, endpoint, provider)
    assert set(counted["usage"]) == {"input_tokens", "output_tokens"} and b"estimated" not in raw
    assert 0 < counted["usage"]["input_tokens"] <= expected["input_tokens"]
    assert 0 < counted["usage"]["output_tokens"] == len(ANSWER) <= expected["output_tokens"]


@pytest.mark.e2e
@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("provider", list(UPSTREAM))
def test_reported_usage_is_the_providers_own_with_no_estimated_key(
    srv: Server, fake: FakeUpstream, provider: str, endpoint: str
) -> None:
    fake.behave(UPSTREAM[provider], deltas=ANSWER, input_tokens=17, output_tokens=5)
    answer, raw, _, request_id = ask(srv, endpoint, provider)
    assert answer["usage"] == {"input_tokens": 17, "output_tokens": 5}
    assert b'"usage":{"input_tokens":17,"output_tokens":5}' in raw  # byte for byte as before
    assert b"estimated" not in raw
    line = access_line(srv, request_id)
    assert (line["input_tokens"], line["output_tokens"]) == (17, 5)
    assert "usage_estimated" not in line


@pytest.mark.e2e
@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("provider", list(UPSTREAM))
@pytest.mark.parametrize("reported", ["input", "output"])
def test_a_count_the_provider_gave_is_kept_and_only_the_missing_one_estimated(
    srv: Server, fake: FakeUpstream, provider: str, endpoint: str, reported: str
) -> None:
    """A 0 beside a real count is a missing count (no request is 0 tokens, no text is 0 tokens)."""
    upstream = UPSTREAM[provider]
    counts = {"input_tokens": 17, "output_tokens": 0} if reported == "input" else {"input_tokens": 0}
    fake.behave(upstream, deltas=ANSWER, **counts)
    answer, _, text, request_id = ask(srv, endpoint, provider)
    system, history, message = sent(fake, upstream)
    if reported == "input":
        expected = {"input_tokens": 17, "output_tokens": estimate_output_tokens(text), "estimated": True}
    else:  # the fake's own output count: one per delta
        expected = {
            "input_tokens": estimate_input_tokens(system, history, message),
            "output_tokens": len(ANSWER),
            "estimated": True,
        }
    assert answer["usage"] == expected
    assert access_line(srv, request_id)["usage_estimated"] is True


@pytest.mark.e2e
@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("provider", list(UPSTREAM))
def test_an_answer_with_no_text_counts_no_output(
    srv: Server, fake: FakeUpstream, provider: str, endpoint: str
) -> None:
    upstream = UPSTREAM[provider]
    fake.behave(upstream, deltas=[], omit_usage=True)
    answer, _, text, _ = ask(srv, endpoint, provider)
    assert text == ""
    system, history, message = sent(fake, upstream)
    assert answer["usage"] == {
        "input_tokens": estimate_input_tokens(system, history, message),
        "output_tokens": 0,
        "estimated": True,
    }


@pytest.mark.e2e
@pytest.mark.parametrize("provider", list(UPSTREAM))
def test_a_stream_that_breaks_logs_what_was_used_so_far(
    srv: Server, fake: FakeUpstream, provider: str
) -> None:
    """Broken after two deltas: Anthropic's message_start had given the input (kept), neither format
    had given the output yet (estimated from what was relayed), OpenAI nothing at all."""
    upstream = UPSTREAM[provider]
    fake.behave(upstream, deltas=ANSWER, drop_after=2, input_tokens=17, output_tokens=5)
    end, _, text, request_id = ask(srv, "/api/chat/stream", provider)
    assert end["error"]["code"] == "upstream_error" and text == "".join(ANSWER[:2])
    system, history, message = sent(fake, upstream)
    line = access_line(srv, request_id)
    assert line["error"] == "upstream_error" and line["usage_estimated"] is True
    expected_input = 17 if upstream == "anthropic" else estimate_input_tokens(system, history, message)
    assert (line["input_tokens"], line["output_tokens"]) == (expected_input, estimate_output_tokens(text))
