"""Fallback settings (`N_FALLBACK`), which failures are worth the fallback, and the circuit breaker's
states, in process (tests/test_e2e_fallback.py has the same end to end)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from pwachat.errors import UpstreamError, UpstreamRateLimited, UpstreamTimeout, UpstreamUnavailable
from pwachat.providers import Breaker, Providers, fallback_worthy
from pwachat.providers.anthropic import AnthropicProvider
from pwachat.providers.http_provider import UpstreamHTTP, error_for_status
from pwachat.providers.openai import OpenAIProvider
from pwachat.settings import BREAKER_FAILURES, ConfigError, Settings

NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing here is sent
KEYS = {"OPENAI_API_KEY": "sk-o", "ANTHROPIC_API_KEY": "sk-a"}
LOCAL = {"PROVIDERS": "local", "LOCAL_BASE_URL": NOWHERE + "/v1", "LOCAL_MODELS": "llama3.2, qwen2.5:0.5b"}


def load(*base: dict[str, str], **env: str) -> Settings:
    merged = {k: v for b in base for k, v in b.items()}
    return Settings.from_mapping({"LOG_FILE": "", **merged, **env})


def fallbacks(s: Settings) -> dict[str, tuple[str, str]]:
    return {spec.name: spec.fallback for spec in s.providers if spec.fallback is not None}


# --------------------------------------------------------------------------------------------
# N_FALLBACK
# --------------------------------------------------------------------------------------------


def test_no_fallback_by_default() -> None:
    assert fallbacks(load(KEYS, LOCAL)) == {}
    assert load().provider_breaker_s == 30.0


def test_the_fallback_is_its_default_model_or_the_one_named() -> None:
    s = load(KEYS, LOCAL, OPENAI_FALLBACK="claude", LOCAL_FALLBACK="openai:gpt-4o")
    assert fallbacks(s) == {"openai": ("claude", "claude-sonnet-4-5"), "local": ("openai", "gpt-4o")}


def test_a_fallback_may_be_listed_later_and_its_model_may_hold_colons() -> None:
    # A built-in falling back to a PROVIDERS entry (read after it), by an alias in any case.
    s = load(KEYS, LOCAL, OPENAI_FALLBACK="LOCAL:qwen2.5:0.5b", LOCAL_FALLBACK="Anthropic")
    assert fallbacks(s) == {"openai": ("local", "qwen2.5:0.5b"), "local": ("claude", "claude-sonnet-4-5")}


def test_claude_reads_claude_fallback_and_anthropic_fallback() -> None:
    assert fallbacks(load(KEYS, CLAUDE_FALLBACK="openai")) == {"claude": ("openai", "gpt-4o-mini")}
    assert fallbacks(load(KEYS, ANTHROPIC_FALLBACK="openai")) == {"claude": ("openai", "gpt-4o-mini")}
    same = load(KEYS, CLAUDE_FALLBACK="openai", ANTHROPIC_FALLBACK="openai")
    assert fallbacks(same) == {"claude": ("openai", "gpt-4o-mini")}


def test_echo_has_no_fallback_but_may_be_one() -> None:
    assert fallbacks(load(KEYS, ECHO_FALLBACK="openai")) == {}
    assert fallbacks(load(KEYS, OPENAI_FALLBACK="echo")) == {"openai": ("echo", "echo")}


def test_cycles_may_be_configured() -> None:
    # Each request moves once at most (routes/chat.py), so A -> B and B -> A is two fallbacks, no loop.
    s = load(KEYS, OPENAI_FALLBACK="claude", CLAUDE_FALLBACK="openai")
    assert fallbacks(s) == {"openai": ("claude", "claude-sonnet-4-5"), "claude": ("openai", "gpt-4o-mini")}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OPENAI_FALLBACK": "openai"}, "OPENAI_FALLBACK: a provider cannot fall back to itself"),
        ({"OPENAI_FALLBACK": "openai:gpt-4o"}, "OPENAI_FALLBACK: a provider cannot fall back to itself"),
        ({"LOCAL_FALLBACK": "local:llama3.2"}, "LOCAL_FALLBACK: a provider cannot fall back to itself"),
        ({"ANTHROPIC_FALLBACK": "claude"}, "ANTHROPIC_FALLBACK: a provider cannot fall back to itself"),
        ({"OPENAI_FALLBACK": "nobody"}, "OPENAI_FALLBACK: 'nobody' is not a provider"),
        ({"OPENAI_FALLBACK": "claude:gpt-4o"}, "OPENAI_FALLBACK: 'gpt-4o' is not one of claude's models"),
        ({"OPENAI_FALLBACK": "claude:"}, "OPENAI_FALLBACK: nothing follows the ':'"),
        (
            {"CLAUDE_FALLBACK": "openai", "ANTHROPIC_FALLBACK": "local"},
            "CLAUDE_FALLBACK: ANTHROPIC_FALLBACK is set too",
        ),
        ({"OPENAI_FALLBACK": "echo", "ECHO_PROVIDER": "off"}, "OPENAI_FALLBACK: 'echo' cannot serve"),
        ({"PROVIDER_BREAKER_S": "0"}, "PROVIDER_BREAKER_S: must be between"),
        ({"PROVIDER_BREAKER_S": "soon"}, "PROVIDER_BREAKER_S: expected a number"),
    ],
)
def test_bad_fallbacks_stop_start_up_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(KEYS, LOCAL, **env)
    assert str(err.value).startswith(message), err.value


def test_a_fallback_that_cannot_serve_is_refused_only_for_a_provider_that_can() -> None:
    with pytest.raises(
        ConfigError, match=r"^LOCAL_FALLBACK: 'claude' cannot serve \(its API key is not set\)"
    ):
        load(LOCAL, LOCAL_FALLBACK="claude")
    # openai has no key either: its fallback would never be used, and is no reason not to start.
    assert fallbacks(load(OPENAI_FALLBACK="claude")) == {"openai": ("claude", "claude-sonnet-4-5")}


def test_the_fallbacks_are_resolved_once_into_provider_objects() -> None:
    s = load(
        KEYS, LOCAL, OPENAI_FALLBACK="local:qwen2.5:0.5b", LOCAL_FALLBACK="openai", PROVIDER_BREAKER_S="2.5"
    )
    # Stand-ins for the provider objects (build_providers makes the real ones from the same table).
    providers = Providers(s, {spec.name: object() for spec in s.providers})  # type: ignore[misc]
    assert set(providers.fallbacks) == {"openai", "local"}
    fb = providers.fallbacks["openai"]
    assert fb.provider is providers.serving["local"] and fb.model == "qwen2.5:0.5b"
    assert fb.header == (b"x-fallback-from", b"openai")
    assert fb.breaker is providers.breakers["openai"] and fb.breaker.period == 2.5
    assert fb.target_breaker is providers.breakers["local"]  # local has a fallback of its own
    assert "claude" not in providers.breakers  # no fallback: no breaker
    assert not providers.degraded("openai") and not providers.degraded("claude")


# --------------------------------------------------------------------------------------------
# What is worth the fallback
# --------------------------------------------------------------------------------------------


def _openai() -> OpenAIProvider:
    return OpenAIProvider(load(KEYS), base_url=NOWHERE, headers={})


def _anthropic() -> AnthropicProvider:
    return AnthropicProvider(load(KEYS), base_url=NOWHERE, headers={})


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 408, 529, 599])
def test_429_5xx_and_timeouts_from_the_providers_are_worth_the_fallback(status: int) -> None:
    # The providers' own mapping, as they raise it (UpstreamUnavailable where they make it).
    for provider in (_openai(), _anthropic()):
        assert fallback_worthy(provider._map_status(status, {})), (provider.name, status)
    assert fallback_worthy(error_for_status("Groq", status, {"retry-after": "3"}))


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 409, 413, 422])
def test_a_request_the_provider_refused_is_not(status: int) -> None:
    for provider in (_openai(), _anthropic()):
        assert not fallback_worthy(provider._map_status(status, {})), (provider.name, status)


def test_overloaded_and_transport_failures_are_not_ours_are() -> None:
    anthropic = _anthropic()
    assert fallback_worthy(anthropic._map_event_error("overloaded_error", "Overloaded"))
    assert fallback_worthy(anthropic._map_event_error("rate_limit_error", ""))
    assert fallback_worthy(anthropic._map_event_error("timeout_error", ""))
    assert not fallback_worthy(anthropic._map_event_error("invalid_request_error", ""))
    assert fallback_worthy(UpstreamTimeout())
    assert fallback_worthy(UpstreamRateLimited())
    # What the route makes of a provider failing in a way it did not map (a bug): not the upstream's fault.
    assert not fallback_worthy(UpstreamError("The provider failed"))
    assert not fallback_worthy(UpstreamError("Anthropic answered something unusable"))
    assert not fallback_worthy(ValueError("Could not reach X"))


def test_a_refused_connection_is_worth_the_fallback() -> None:
    async def refused() -> UpstreamError:
        with socket.socket() as s:  # a port where nothing listens: bound, never listening
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}"
            http = UpstreamHTTP(
                label="Local", base_url=url, headers={}, max_retries=0, map_status=error_for_status
            )
            try:
                await http.post("/v1/chat/completions", b"{}")
            except UpstreamError as err:
                return err
            finally:
                await http.aclose()
        raise AssertionError("a closed port answered")

    err = asyncio.run(refused())
    assert fallback_worthy(err), err.message


# --------------------------------------------------------------------------------------------
# The breaker
# --------------------------------------------------------------------------------------------

DOWN = UpstreamUnavailable("OpenAI failed (HTTP 503)")
REFUSED = UpstreamError("OpenAI refused the request (HTTP 400)")


def test_the_breaker_opens_after_five_failures_in_a_row() -> None:
    b = Breaker(30.0)
    for _ in range(BREAKER_FAILURES - 1):
        b.record(DOWN)
        assert not b.open and not b.skips()
    b.record(DOWN)
    assert b.open and b.skips() and b.skips()


def test_any_answer_ends_a_run_of_failures() -> None:
    b = Breaker(30.0)
    for answer in (None, REFUSED):
        for _ in range(BREAKER_FAILURES - 1):
            b.record(DOWN)
        b.record(answer)  # a 200 or a 400: the provider is up
        b.record(DOWN)
        assert not b.open


def test_after_the_period_one_request_tries_and_its_outcome_decides() -> None:
    b = Breaker(30.0)
    for _ in range(BREAKER_FAILURES):
        b.record(DOWN)
    b.open_until = time.monotonic() - 0.001  # the period is over (no sleep)
    assert not b.skips()  # this request tries the provider
    assert b.skips() and b.open  # the others still go to the fallback while it does
    b.record(DOWN)  # the try failed: open again, for a whole period
    assert b.open and b.skips() and b.open_until > time.monotonic() + 29
    b.open_until = time.monotonic() - 0.001
    assert not b.skips()
    b.record(None)  # the try succeeded: closed
    assert not b.open and not b.skips() and b.failures == 0


def test_a_try_that_never_reports_costs_one_period() -> None:
    b = Breaker(30.0)
    for _ in range(BREAKER_FAILURES):
        b.record(DOWN)
    b.open_until = time.monotonic() - 0.001
    assert not b.skips()  # tried, and its reader left: nothing recorded
    assert b.skips()
    b.open_until = time.monotonic() - 0.001
    assert not b.skips()  # the next period: tried again
