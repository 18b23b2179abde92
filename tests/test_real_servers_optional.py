"""Optional: pwachat's providers against a real LiteLLM proxy, in both wire formats (issue 12, item 6).

Not part of CI: the module skips unless LiteLLM's proxy is installed, which the project does not do (it
is big and pins its own dependencies). To run it, install LiteLLM into a virtualenv of its own and name
its executable::

    python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]==1.82.6'
    PWACHAT_LITELLM=/tmp/litellm-venv/bin/litellm .venv/bin/pytest tests/test_real_servers_optional.py

(`litellm` on PATH is used when PWACHAT_LITELLM is unset; a PWACHAT_LITELLM that is no executable skips.)
1.82.6 is the version it was written against; 1.82.7 and 1.82.8 were the releases compromised on PyPI.

The chain is ``client -> pwachat serve -> LiteLLM proxy -> the fake upstream``, all on 127.0.0.1. LiteLLM
routes `gpt-4o-mini` to the fake's OpenAI side and `claude-sonnet-4-5` to its Anthropic side. pwachat's
`openai` provider reaches LiteLLM's ``/v1/chat/completions``, its `claude` provider LiteLLM's
``/v1/messages``, each with LiteLLM's master key, and each offers both models, so four routes are tried:
two where LiteLLM relays a format to the same format, and two where it translates (OpenAI's format to
an Anthropic upstream, Anthropic's format to an OpenAI upstream). The fake answers
``"Echo from <side>: <message>"``, so the text tells which side a request reached.

What LiteLLM 1.82.6 does that the fake alone does not (the tests below hold pwachat to the contract
through each of these):

- ``/v1/messages`` for an `openai/...` model goes to OpenAI's Responses API (``/v1/responses``) unless
  ``use_chat_completions_url_for_anthropic_messages`` is set; it is set here, since the fake (like
  llama.cpp, Ollama and vLLM) speaks Chat Completions.
- A provider's usage is passed on, streamed or not, in both formats. Translated to Anthropic's format,
  the stream's ``message_start`` says ``input_tokens: 0`` and the count comes in ``message_delta``.
  When the provider counted nothing, answers carry no usage (pwachat estimates), but streams carry
  LiteLLM's own count, except Anthropic's stream relayed unchanged (its zeros come through, pwachat
  estimates).
- Errors come back in OpenAI's error body on both routes, with the upstream's status (429, 503),
  except an Anthropic 503 (overloaded) translated to OpenAI's format, which becomes a 500; a
  connection dropped before the answer is a 500. The provider's ``retry-after`` is not passed on.
- A provider error mid-stream becomes ``data: {"error": ...}``, with no ``event:`` name on the
  Anthropic route too (pwachat sees a stream that ended without ``message_stop``), or, relayed
  unchanged, Anthropic's ``event: error``. pwachat ends the stream with an `error` event in each case.
- A connection the provider drops mid-stream is ended by LiteLLM as a finished answer (a clean stop,
  with usage it counted), except Anthropic's stream relayed unchanged, which it cuts too: there pwachat
  sends an `error` event, elsewhere it cannot tell, and sends `done`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import LEAKS
from fake_upstream import DEFAULT_ANTHROPIC_KEY, DEFAULT_OPENAI_KEY, FakeUpstream
from reference import parse_sse
from server import Server, clean_env, free_port, start_server, stop_server


def _find_litellm() -> tuple[str | None, str]:
    configured = os.environ.get("PWACHAT_LITELLM")
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured, ""
        return None, f"PWACHAT_LITELLM={configured} is not an executable file"
    found = shutil.which("litellm")
    if found:
        return found, ""
    return None, (
        "LiteLLM's proxy is not installed: `python3 -m venv /tmp/litellm-venv && "
        "/tmp/litellm-venv/bin/pip install 'litellm[proxy]==1.82.6'`, then set "
        "PWACHAT_LITELLM=/tmp/litellm-venv/bin/litellm (or put `litellm` on PATH)"
    )


LITELLM, _WHY_NOT = _find_litellm()
if LITELLM is None:
    pytest.skip(_WHY_NOT, allow_module_level=True)

pytestmark = pytest.mark.e2e

MASTER_KEY = "sk-litellm-test-master"  # what pwachat sends LiteLLM; LiteLLM sends the fake its own keys
OPENAI_MODEL = "gpt-4o-mini"  # LiteLLM: openai/gpt-4o-mini at the fake's /v1
CLAUDE_MODEL = "claude-sonnet-4-5"  # LiteLLM: anthropic/claude-sonnet-4-5 at the fake
UPSTREAM_SECRET = "upstream-detail-l1tellm"  # the fake's error text, quoted by LiteLLM: never in our answers
NEVER_SHOWN = (*LEAKS, MASTER_KEY, DEFAULT_OPENAI_KEY, DEFAULT_ANTHROPIC_KEY, UPSTREAM_SECRET, "litellm")
UNLIMITED = {"RATELIMIT_PER_MINUTE": "100000", "RATELIMIT_PER_HOUR": "100000", "RATELIMIT_PER_DAY": "100000"}
READY_WITHIN_S = 120  # LiteLLM imports a great deal: about 10 s here, more on a busy machine


@dataclass(frozen=True)
class Route:
    """One way through: pwachat's provider (hence the format it speaks to LiteLLM), the model asked for,
    the fake's side LiteLLM sends it to, and the upstream path it reaches there."""

    provider: str
    model: str
    side: str

    @property
    def upstream_path(self) -> str:
        return "/v1/chat/completions" if self.side == "openai" else "/v1/messages"

    def __str__(self) -> str:
        fmt = "openai" if self.provider == "openai" else "anthropic"
        return f"{fmt}-format-to-{self.side}"


ROUTES = [
    Route("openai", OPENAI_MODEL, "openai"),  # relayed: Chat Completions on both sides
    Route("openai", CLAUDE_MODEL, "anthropic"),  # translated: Chat Completions -> Messages
    Route("claude", CLAUDE_MODEL, "anthropic"),  # relayed: Messages on both sides
    Route("claude", OPENAI_MODEL, "openai"),  # translated: Messages -> Chat Completions
]
each_route = pytest.mark.parametrize("route", ROUTES, ids=str)


# --------------------------------------------------------------------------------------------
# LiteLLM's proxy as a process
# --------------------------------------------------------------------------------------------


@dataclass
class LiteLLM:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    version: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self, tail: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-tail:])

    def get(self, path: str) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {MASTER_KEY}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
        try:
            with opener.open(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None


def litellm_config(fake: FakeUpstream) -> dict[str, Any]:
    """The proxy's config (JSON is YAML): two models on the fake, a master key, no database, no retries."""
    return {
        "model_list": [
            {
                "model_name": OPENAI_MODEL,
                "litellm_params": {
                    "model": f"openai/{OPENAI_MODEL}",
                    "api_base": fake.openai_base_url,
                    "api_key": fake.openai_key,
                },
            },
            {
                "model_name": CLAUDE_MODEL,
                "litellm_params": {
                    "model": f"anthropic/{CLAUDE_MODEL}",
                    "api_base": fake.anthropic_base_url,
                    "api_key": fake.anthropic_key,
                },
            },
        ],
        "litellm_settings": {
            "num_retries": 0,  # one upstream request per pwachat request, so the fake's records count them
            "request_timeout": 30,
            # /v1/messages for an openai/ model would otherwise go to the Responses API (/v1/responses)
            "use_chat_completions_url_for_anthropic_messages": True,
        },
        "router_settings": {"num_retries": 0},
        "general_settings": {"master_key": MASTER_KEY},
    }


def litellm_env() -> dict[str, str]:
    """The parent's environment without what pwachat, LiteLLM or a proxy setting would read, plus
    LiteLLM's switches for an offline start: its bundled cost map and Anthropic beta-header table instead
    of fetching them, no .env file read (PRODUCTION mode)."""
    drop = {"DATABASE_URL", "DIRECT_URL", "STORE_MODEL_IN_DB", "REDIS_HOST", "REDIS_URL", "REDIS_PORT"}
    env = {
        k: v
        for k, v in clean_env().items()
        if k not in drop
        and not k.startswith("LITELLM_")
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS="True",
        LITELLM_MODE="PRODUCTION",
        LITELLM_LOG="WARNING",
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


def start_litellm(tmp: Path, fake: FakeUpstream) -> LiteLLM:
    config = tmp / "litellm.yaml"
    config.write_text(json.dumps(litellm_config(fake), indent=2))
    port = free_port()
    log_path = tmp / "litellm.out"
    command = [LITELLM, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as sink:
        proc = subprocess.Popen(
            [*command, "--telemetry", "False"],
            cwd=tmp,
            env=litellm_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stopping it stops whatever it started
        )
    proxy = LiteLLM(port, proc, log_path)
    deadline = time.monotonic() + READY_WITHIN_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"LiteLLM exited with {proc.returncode}:\n{proxy.output()}")
        with contextlib.suppress(OSError, ValueError):
            status, health = proxy.get("/health/readiness")
            if status == 200 and health.get("status") == "healthy":
                status, models = proxy.get("/v1/models")
                if status == 200 and {m["id"] for m in models["data"]} >= {OPENAI_MODEL, CLAUDE_MODEL}:
                    proxy.version = health.get("litellm_version", "")
                    return proxy
        time.sleep(0.2)  # polling for readiness with a deadline, not synchronisation by sleep
    stop_litellm(proxy)
    raise RuntimeError(f"LiteLLM did not become ready within {READY_WITHIN_S} s:\n{proxy.output()}")


def stop_litellm(proxy: LiteLLM) -> None:
    if proxy.proc.poll() is None:
        proxy.proc.terminate()
        try:
            proxy.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proxy.proc.kill()
            proxy.proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proxy.proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh_fake(fake: FakeUpstream) -> Iterator[None]:
    fake.reset()
    yield
    fake.reset()


@pytest.fixture(scope="module")
def litellm(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[LiteLLM]:
    proxy = start_litellm(tmp_path_factory.mktemp("litellm"), fake)
    try:
        yield proxy
    finally:
        stop_litellm(proxy)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, litellm: LiteLLM) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("pwachat-litellm"),
        OPENAI_BASE_URL=f"{litellm.url}/v1",
        OPENAI_API_KEY=MASTER_KEY,
        OPENAI_MODELS=f"{OPENAI_MODEL},{CLAUDE_MODEL}",
        ANTHROPIC_BASE_URL=litellm.url,
        ANTHROPIC_API_KEY=MASTER_KEY,
        ANTHROPIC_MODELS=f"{CLAUDE_MODEL},{OPENAI_MODEL}",
        UPSTREAM_MAX_RETRIES="0",
        WORKERS="1",
        **UNLIMITED,
    )
    try:
        yield srv
    finally:
        stop_server(srv)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

MESSAGE = "Tell me about relays"


def payload(route: Route, **extra: Any) -> dict[str, Any]:
    return {"message": MESSAGE, "provider": route.provider, "model": route.model, **extra}


def answer_of(route: Route, message: str = MESSAGE) -> str:
    """The fake's default answer for `message` on the side `route` reaches (see fake_upstream.py)."""
    return f"Echo from {route.side}: {message}"


def completions(fake: FakeUpstream, route: Route) -> list[dict[str, Any]]:
    return [r for r in fake.requests(route.side) if r["method"] == "POST"]


def check_upstream_request(fake: FakeUpstream, route: Route, *, stream: bool) -> None:
    """Exactly one request reached the fake, on the side and path the route names, with the fake's own
    key (LiteLLM's credential, not pwachat's master key) and the model LiteLLM maps to."""
    records = completions(fake, route)
    assert len(records) == 1, [(r["path"], r["status"]) for r in records]
    rec = records[0]
    assert rec["path"] == route.upstream_path, rec["path"]
    headers = rec["headers"]
    if route.side == "openai":
        assert headers["authorization"] == f"Bearer {DEFAULT_OPENAI_KEY}", headers
    else:
        bearer = f"Bearer {DEFAULT_ANTHROPIC_KEY}"
        assert headers.get("x-api-key") == DEFAULT_ANTHROPIC_KEY or headers.get("authorization") == bearer
    assert MASTER_KEY not in json.dumps(headers)
    assert rec["body"]["model"] == route.model
    assert bool(rec["body"].get("stream")) is stream


def read_stream(
    srv: Server, body: dict[str, Any]
) -> tuple[int, dict[str, str], list[tuple[str, Any]], bytes]:
    """POST /api/chat/stream, read to its end: (status, headers, [(event, data)], raw body).

    Checks the contract's framing on the way: ids 0, 1, 2, ... on every event, one `start` first, only
    non-empty `delta`s between, exactly one terminal event, last."""
    status, headers, raw = srv.post_json("/api/chat/stream", body)
    if status != 200 or not headers.get("content-type", "").startswith("text/event-stream"):
        return status, headers, [], raw
    messages, _ = parse_sse(raw)
    assert [m.last_event_id for m in messages] == [str(i) for i in range(len(messages))], messages
    events = [(m.type, json.loads(m.data)) for m in messages]
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] in ("done", "error"), names
    assert set(names[1:-1]) <= {"delta"}, names
    assert all(isinstance(d["content"], str) and d["content"] for _, d in events[1:-1]), events
    text = raw.decode()
    for needle in NEVER_SHOWN:
        assert needle not in text, f"{needle!r} leaked into {text}"
    return status, headers, events, raw


def check_usage(usage: dict[str, Any], *, reported: tuple[int, int] | None) -> None:
    """`reported`: the provider's own count (then no `estimated` key); None: pwachat's estimate."""
    if reported is not None:
        assert usage == {"input_tokens": reported[0], "output_tokens": reported[1]}, usage
    else:
        assert usage["estimated"] is True, usage
        assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0, usage


def check_json_error(
    status: int, headers: dict[str, str], raw: bytes, want: int, code: str
) -> dict[str, Any]:
    """The contract's error envelope, with the request id of the answer and nothing of LiteLLM's text."""
    assert status == want, (status, raw)
    assert headers["content-type"].startswith("application/json"), headers
    doc = json.loads(raw)
    assert set(doc) == {"error"}, doc
    err = doc["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert err["request_id"] == headers["x-request-id"], (err, headers)
    text = raw.decode()
    for needle in NEVER_SHOWN:
        assert needle not in text, f"{needle!r} leaked into {text}"
    return err


# --------------------------------------------------------------------------------------------
# Answers, both endpoints, all four routes
# --------------------------------------------------------------------------------------------


@each_route
def test_chat_answers_through_litellm(served: Server, fake: FakeUpstream, route: Route) -> None:
    fake.behave(route.side, input_tokens=23, output_tokens=9)
    status, _, raw = served.post_json("/api/chat", payload(route))
    assert status == 200, raw
    answer = json.loads(raw)
    assert answer["id"].startswith("chat_")
    assert (answer["provider"], answer["model"]) == (route.provider, route.model)
    assert answer["response"] == answer_of(route)
    assert answer["finish_reason"] == "stop"  # `end_turn` on the Anthropic side
    check_usage(answer["usage"], reported=(23, 9))  # LiteLLM passes the provider's count on
    check_upstream_request(fake, route, stream=False)
    for needle in NEVER_SHOWN:
        assert needle not in raw.decode(), needle


@each_route
def test_stream_answers_through_litellm(served: Server, fake: FakeUpstream, route: Route) -> None:
    fake.behave(route.side, input_tokens=23, output_tokens=9)
    status, headers, events, raw = read_stream(served, payload(route))
    assert status == 200, raw
    assert headers["content-type"].startswith("text/event-stream")
    (_, start), *deltas, (end_name, end) = events
    assert start["id"].startswith("chat_")
    assert (start["provider"], start["model"]) == (route.provider, route.model)
    assert "".join(d["content"] for _, d in deltas) == answer_of(route)
    assert len(deltas) > 1  # relayed as it came, not gathered into one
    assert end_name == "done", end
    assert end["finish_reason"] == "stop"
    # LiteLLM passes usage on in streams too: OpenAI's usage chunk (pwachat asks for it with
    # stream_options.include_usage), Anthropic's message_start/message_delta. On the translated
    # Anthropic route message_start says 0 input tokens and message_delta brings the count.
    check_usage(end["usage"], reported=(23, 9))
    check_upstream_request(fake, route, stream=True)


@each_route
def test_stream_and_chat_give_the_same_text(served: Server, fake: FakeUpstream, route: Route) -> None:
    body = payload(route, message="Same words both ways, please")
    status, _, raw = served.post_json("/api/chat", body)
    assert status == 200, raw
    _, _, events, _ = read_stream(served, body)
    streamed = "".join(d["content"] for name, d in events if name == "delta")
    assert streamed == json.loads(raw)["response"] == answer_of(route, "Same words both ways, please")


@each_route
def test_a_max_tokens_cut_is_length_on_both_endpoints(
    served: Server, fake: FakeUpstream, route: Route
) -> None:
    # The fake stops after max_tokens deltas with `length` (OpenAI) or `max_tokens` (Anthropic); LiteLLM
    # translates between the two, pwachat says `length` whatever it got.
    want = " ".join(answer_of(route).split(" ")[:3])
    status, _, raw = served.post_json("/api/chat", payload(route, max_tokens=3))
    assert status == 200, raw
    answer = json.loads(raw)
    assert (answer["response"], answer["finish_reason"]) == (want, "length")
    _, _, events, _ = read_stream(served, payload(route, max_tokens=3))
    assert "".join(d["content"] for name, d in events if name == "delta") == want
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "length", events[-1]


# --------------------------------------------------------------------------------------------
# Failures: before the stream is committed (JSON), and after (an `error` event)
# --------------------------------------------------------------------------------------------

# (route, the fake's status) -> pwachat's answer, as LiteLLM 1.82.6 maps them: the upstream status is
# kept (an Anthropic 503 translated to OpenAI's format is a 500), pwachat maps that status.
ERRORS = [
    pytest.param(route, upstream, want, code, id=f"{route}-{upstream}")
    for route in ROUTES
    for upstream, want, code in ((429, 503, "upstream_rate_limited"), (503, 502, "upstream_error"))
]


@pytest.mark.parametrize(("route", "upstream", "want", "code"), ERRORS)
def test_an_upstream_error_comes_back_as_the_contract_error(
    served: Server, fake: FakeUpstream, route: Route, upstream: int, want: int, code: str
) -> None:
    fake.behave(route.side, status=upstream, retry_after=7, error_message=UPSTREAM_SECRET)
    status, headers, raw = served.post_json("/api/chat", payload(route))
    check_json_error(status, headers, raw, want, code)
    if code == "upstream_rate_limited":
        # LiteLLM does not pass the provider's retry-after (7) on, so pwachat has none to pass on.
        assert "retry-after" not in headers, headers
    # The stream answers the same, as JSON: the failure came before anything was committed.
    status, headers, _, raw = read_stream(served, payload(route))
    check_json_error(status, headers, raw, want, code)
    assert len(completions(fake, route)) == 2  # neither LiteLLM nor pwachat retried


@each_route
def test_a_provider_error_mid_stream_ends_with_an_error_event(
    served: Server, fake: FakeUpstream, route: Route
) -> None:
    # OpenAI side: an `error` object in a chunk; Anthropic side: `event: error` (overloaded). LiteLLM
    # relays them as `data: {"error": ...}` (no event name on the Anthropic route) or, on the Anthropic
    # route to the Anthropic side, as they came.
    fake.behave(route.side, error_event_after=2, error_message=UPSTREAM_SECRET)
    status, headers, events, raw = read_stream(served, payload(route))
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), raw
    (_, start), *deltas, (end_name, end) = events
    assert start["provider"] == route.provider
    assert "".join(d["content"] for _, d in deltas) == " ".join(answer_of(route).split(" ")[:2])
    assert end_name == "error", events
    assert end["error"]["code"] == "upstream_error" and end["error"]["message"], end
    assert [name for name, _ in events].count("done") == 0


def test_a_connection_dropped_before_the_answer_is_a_502(served: Server, fake: FakeUpstream) -> None:
    # The fake drops the connection without answering; LiteLLM answers 500, pwachat `upstream_error`.
    for route in ROUTES:
        fake.behave(route.side, drop_after=0, count=1)
        status, headers, raw = served.post_json("/api/chat", payload(route))
        check_json_error(status, headers, raw, 502, "upstream_error")


@each_route
def test_a_connection_dropped_mid_stream_ends_as_litellm_ends_it(
    served: Server, fake: FakeUpstream, route: Route
) -> None:
    """The fake cuts its connection after 2 deltas. Relaying Anthropic's format unchanged, LiteLLM cuts
    its own stream too, and pwachat ends with an `error` event. On the other three routes LiteLLM ends
    its stream as a finished answer (finish_reason `stop` and [DONE], or `end_turn` and message_stop)
    with usage it counted itself: pwachat cannot tell, and relays a `done`. Some of the 2 deltas may be
    lost in the cut (the fake resets the connection, which may discard what LiteLLM had not read yet),
    so the text is only known to be the start of the answer."""
    fake.behave(route.side, drop_after=2, chunk_interval_s=0.05)
    status, headers, events, raw = read_stream(served, payload(route))
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), raw
    text = "".join(d["content"] for name, d in events if name == "delta")
    assert answer_of(route).startswith(text) and len(text) < len(answer_of(route)), text
    end_name, end = events[-1]
    if route.provider == "claude" and route.side == "anthropic":
        assert end_name == "error", events
        assert end["error"]["code"] == "upstream_error", end
    else:
        assert end_name == "done", events
        assert end["finish_reason"] == "stop", end  # nothing says the answer was cut
    assert fake.wait_for(lambda recs: [r for r in recs if r["dropped"]], timeout=5)


# --------------------------------------------------------------------------------------------
# Usage a provider did not count
# --------------------------------------------------------------------------------------------


@each_route
def test_usage_the_provider_did_not_count_is_never_zero(
    served: Server, fake: FakeUpstream, route: Route
) -> None:
    """With no usage from the fake (OpenAI: none at all; Anthropic: zeros), LiteLLM passes nothing on in
    answers, and pwachat estimates. In streams, LiteLLM counts the tokens itself (its tokenizer) on every
    route but the one that relays Anthropic's stream unchanged: its count is then taken as the
    provider's; on that route the zeros come through, and pwachat estimates."""
    fake.behave(route.side, omit_usage=True)
    status, _, raw = served.post_json("/api/chat", payload(route))
    assert status == 200, raw
    check_usage(json.loads(raw)["usage"], reported=None)
    _, _, events, _ = read_stream(served, payload(route))
    end_name, end = events[-1]
    assert end_name == "done", events
    usage = end["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0, usage
    litellm_counted = not (route.provider == "claude" and route.side == "anthropic")
    assert ("estimated" in usage) is not litellm_counted, usage
