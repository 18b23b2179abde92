"""Custom providers (`PROVIDERS`, contract "Providers") against the real `pwachat serve` and the fake
upstream: one OpenAI-format server without a key (as llama.cpp or Ollama run), one Anthropic-format
server with a key, beside the built-in OpenAI. They are listed, shown in health, served through
`/api/chat` and the stream with their own model and credentials, counted in /metrics, and shown by
the PWA's picker; bad PROVIDERS settings stop `pwachat serve` in one line."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import reference
from fake_upstream import DEFAULT_ANTHROPIC_KEY, DEFAULT_OPENAI_KEY, FakeUpstream
from server import PWACHAT, Server, clean_env, free_port, start_server, stop_server

pytestmark = pytest.mark.e2e

UNLIMITED = {"RATELIMIT_PER_MINUTE": "100000", "RATELIMIT_PER_HOUR": "100000", "RATELIMIT_PER_DAY": "100000"}
LOCAL_MODELS = ("llama-3.2-1b", "qwen2.5:0.5b")
RELAY_MODELS = ("relay-sonnet", "relay-haiku")
RELAY_KEY = DEFAULT_ANTHROPIC_KEY  # the key the fake's Anthropic side accepts


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    # The OpenAI side takes requests without any Authorization, as llama.cpp without --api-key
    # does; a wrong key is still refused.
    with FakeUpstream(DEFAULT_OPENAI_KEY, RELAY_KEY, keyless_openai=True) as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh_fake(fake: FakeUpstream) -> Iterator[None]:
    fake.reset()
    yield
    fake.reset()


def custom_env(fake: FakeUpstream) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": DEFAULT_OPENAI_KEY,
        "OPENAI_BASE_URL": fake.openai_base_url,
        "PROVIDERS": "local, relay",
        "LOCAL_BASE_URL": fake.openai_base_url,
        "LOCAL_MODELS": ",".join(LOCAL_MODELS),
        "LOCAL_LABEL": "Local llama.cpp",
        "RELAY_BASE_URL": fake.anthropic_base_url,
        "RELAY_FORMAT": "anthropic",
        "RELAY_API_KEY": RELAY_KEY,
        "RELAY_MODELS": ",".join(RELAY_MODELS),
        "UPSTREAM_MAX_RETRIES": "0",
        "WORKERS": "1",
        **UNLIMITED,
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("custom-providers"), **custom_env(fake))
    try:
        yield srv
    finally:
        stop_server(srv)


def get_json(srv: Server, path: str) -> Any:
    status, _, body = srv.request("GET", path)
    assert status == 200, body
    return json.loads(body)


def stream_events(srv: Server, payload: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    status, headers, body = srv.post_json("/api/chat/stream", payload)
    assert status == 200, body
    assert headers["content-type"].startswith("text/event-stream")
    events, _ = reference.parse_sse(body)
    return [(e.type, json.loads(e.data)) for e in events]


def completions(fake: FakeUpstream, upstream: str) -> list[dict[str, Any]]:
    return [r for r in fake.requests(upstream) if r["method"] == "POST"]


# --------------------------------------------------------------------------------------------
# Listed like the built-in ones
# --------------------------------------------------------------------------------------------


def test_models_lists_the_custom_providers_with_their_labels(served: Server) -> None:
    body = get_json(served, "/api/models")
    assert body["default_provider"] == "openai"  # the first that can serve: the built-ins come first
    rows = [(m["provider"], m["id"], m["default"], m.get("label")) for m in body["models"]]
    assert rows == [
        *[("openai", m, i == 0, "OpenAI") for i, m in enumerate(("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"))],
        ("local", LOCAL_MODELS[0], True, "Local llama.cpp"),
        ("local", LOCAL_MODELS[1], False, "Local llama.cpp"),
        ("relay", RELAY_MODELS[0], True, "relay"),  # N_LABEL unset: the name
        ("relay", RELAY_MODELS[1], False, "relay"),
        ("echo", "echo", True, "Echo (offline)"),
    ]
    assert RELAY_KEY not in json.dumps(body)


def test_health_shows_the_custom_providers(served: Server) -> None:
    body = get_json(served, "/api/health")
    assert body["status"] == "ok"
    assert body["providers"] == {
        "openai": {"configured": True, "models": 3, "status": "ok"},
        "claude": {"configured": False, "models": 0, "status": "disabled"},
        "local": {"configured": True, "models": 2, "status": "ok"},
        "relay": {"configured": True, "models": 2, "status": "ok"},
        "echo": {"configured": True, "models": 1, "status": "ok"},
    }


# --------------------------------------------------------------------------------------------
# Relayed through each, with its own model and credentials
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
def test_the_keyless_openai_format_provider_relays_without_credentials(
    served: Server, fake: FakeUpstream, stream: bool
) -> None:
    payload = {"message": "hello local", "provider": "local", "model": LOCAL_MODELS[1]}
    if stream:
        events = stream_events(served, payload)
        assert (events[0][0], events[-1][0]) == ("start", "done")
        assert (events[0][1]["provider"], events[0][1]["model"]) == ("local", LOCAL_MODELS[1])
        text = "".join(data["content"] for name, data in events if name == "delta")
    else:
        status, _, raw = served.post_json("/api/chat", payload)
        assert status == 200, raw
        answer = json.loads(raw)
        assert (answer["provider"], answer["model"]) == ("local", LOCAL_MODELS[1])
        text = answer["response"]
    assert text == "Echo from openai: hello local"
    (record,) = completions(fake, "openai")
    assert record["path"] == "/v1/chat/completions"
    assert record["body"]["model"] == LOCAL_MODELS[1] and record["body"].get("stream", False) is stream
    # No key configured: no credential of any kind, and never the built-in OpenAI's key.
    assert "authorization" not in record["headers"] and "x-api-key" not in record["headers"]
    assert DEFAULT_OPENAI_KEY not in json.dumps(record["headers"])


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
def test_the_anthropic_format_provider_relays_with_its_key(
    served: Server, fake: FakeUpstream, stream: bool
) -> None:
    # Its default model, and the provider's name in any case.
    payload = {"message": "hello relay", "provider": "Relay"}
    if stream:
        events = stream_events(served, payload)
        assert (events[0][1]["provider"], events[0][1]["model"]) == ("relay", RELAY_MODELS[0])
        assert events[-1][0] == "done"
        text = "".join(data["content"] for name, data in events if name == "delta")
    else:
        status, _, raw = served.post_json("/api/chat", payload)
        assert status == 200, raw
        answer = json.loads(raw)
        assert (answer["provider"], answer["model"]) == ("relay", RELAY_MODELS[0])
        text = answer["response"]
    assert text == "Echo from anthropic: hello relay"
    (record,) = completions(fake, "anthropic")
    assert record["path"] == "/v1/messages" and record["body"]["model"] == RELAY_MODELS[0]
    headers = record["headers"]
    sent = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
    assert sent == RELAY_KEY  # where the Anthropic SDK puts it (the fake refuses anything else)
    assert headers.get("anthropic-version")


def test_a_model_alone_picks_its_custom_provider(served: Server, fake: FakeUpstream) -> None:
    status, _, raw = served.post_json("/api/chat", {"message": "hi", "model": RELAY_MODELS[1]})
    assert status == 200, raw
    assert (json.loads(raw)["provider"], json.loads(raw)["model"]) == ("relay", RELAY_MODELS[1])
    assert [r["body"]["model"] for r in completions(fake, "anthropic")] == [RELAY_MODELS[1]]


def test_the_built_in_openai_still_sends_its_own_key(served: Server, fake: FakeUpstream) -> None:
    status, _, raw = served.post_json("/api/chat", {"message": "hi", "provider": "openai"})
    assert status == 200, raw
    (record,) = completions(fake, "openai")
    assert record["headers"]["authorization"] == f"Bearer {DEFAULT_OPENAI_KEY}"


@pytest.mark.parametrize(
    "payload",
    [
        {"provider": "local", "model": RELAY_MODELS[0]},  # another provider's model
        {"provider": "relay", "model": "gpt-4o-mini"},
        {"provider": "local", "model": "llama-3.2-1b-typo"},
        {"model": "nobody-serves-this"},
    ],
)
@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_an_unknown_custom_model_is_400_unknown_model(
    served: Server, fake: FakeUpstream, path: str, payload: dict[str, str]
) -> None:
    status, _, raw = served.post_json(path, {"message": "hi", **payload})
    assert status == 400, raw
    assert json.loads(raw)["error"]["code"] == "unknown_model"
    assert completions(fake, "openai") == [] and completions(fake, "anthropic") == []


def test_provider_errors_name_the_custom_providers_label(served: Server, fake: FakeUpstream) -> None:
    fake.behave("openai", status=429, count=1)
    status, _, raw = served.post_json("/api/chat", {"message": "hi", "provider": "local"})
    assert status == 503, raw
    err = json.loads(raw)["error"]
    assert err["code"] == "upstream_rate_limited" and err["message"].startswith("Local llama.cpp ")


def calls(srv: Server, provider: str, model: str) -> float:
    """The successful provider calls /metrics counted for that provider and model."""
    status, _, body = srv.request("GET", "/metrics")  # a loopback peer, no METRICS_TOKEN
    assert status == 200
    return sum(
        s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
        if s.name == "gen_ai_client_operation_duration_seconds_count"
        and s.labels == {"gen_ai_provider_name": provider, "gen_ai_request_model": model, "error_type": ""}
    )


@pytest.mark.parametrize(("provider", "model"), [("local", LOCAL_MODELS[0]), ("relay", RELAY_MODELS[1])])
def test_custom_providers_are_in_the_metrics_label_sets(served: Server, provider: str, model: str) -> None:
    before = calls(served, provider, model)
    for path in ("/api/chat", "/api/chat/stream"):
        status, _, raw = served.post_json(path, {"message": "hi", "provider": provider, "model": model})
        assert status == 200, raw
    assert calls(served, provider, model) == before + 2


# --------------------------------------------------------------------------------------------
# Bad PROVIDERS settings stop start-up in one line
# --------------------------------------------------------------------------------------------

GOOD = {"PROVIDERS": "local", "LOCAL_BASE_URL": "http://127.0.0.1:9/v1", "LOCAL_MODELS": "m1"}
BAD = [
    ("PROVIDERS", {"PROVIDERS": "Local"}),
    ("PROVIDERS", {"PROVIDERS": "9lives"}),
    ("PROVIDERS", {"PROVIDERS": "local-llm"}),
    ("PROVIDERS", {"PROVIDERS": "a" * 33}),
    ("PROVIDERS", {"PROVIDERS": "openai"}),
    ("PROVIDERS", {"PROVIDERS": "anthropic"}),
    ("PROVIDERS", {"PROVIDERS": "local,echo"}),
    ("PROVIDERS", {"PROVIDERS": "local,local"}),
    ("LOCAL_BASE_URL", {"LOCAL_BASE_URL": ""}),
    ("LOCAL_BASE_URL", {"LOCAL_BASE_URL": "ftp://user:hunter2@127.0.0.1/v1"}),
    ("LOCAL_BASE_URL", {"LOCAL_BASE_URL": "http://127.0.0.1:notaport/v1"}),
    ("LOCAL_MODELS", {"LOCAL_MODELS": " , "}),
    ("LOCAL_FORMAT", {"LOCAL_FORMAT": "gemini"}),
]


@pytest.mark.parametrize(("name", "env"), BAD, ids=[f"{n}={next(iter(e.values()))}" for n, e in BAD])
def test_pwachat_serve_refuses_bad_provider_settings_in_one_line(
    tmp_path: Path, name: str, env: dict[str, str]
) -> None:
    full = clean_env(**{**GOOD, **env, "PORT": str(free_port()), "LOG_FILE": str(tmp_path / "app.log")})
    done = subprocess.run(
        [*PWACHAT, "serve"], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and f"configuration error: {name}: " in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "hunter2" not in done.stderr and "notaport" not in done.stderr


# --------------------------------------------------------------------------------------------
# The PWA's picker shows them by their labels
# --------------------------------------------------------------------------------------------


def test_the_pwa_picker_offers_the_custom_providers(served: Server, fake: FakeUpstream) -> None:
    pytest.importorskip("playwright")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip(f"{chromium} is not installed")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        try:
            page = browser.new_context().new_page()
            page.set_default_timeout(10_000)
            page.goto(f"http://{served.host}:{served.port}/")
            page.wait_for_function("document.body.dataset.state === 'ready'")
            options = page.locator("#provider option")
            expect(options).to_have_text(["OpenAI", "Local llama.cpp", "relay", "Echo (offline)"])
            page.select_option("#provider", "local")
            expect(page.locator("#model option")).to_have_text(
                [f"{LOCAL_MODELS[0]} (default)", LOCAL_MODELS[1]]
            )
            page.select_option("#model", LOCAL_MODELS[1])
            page.fill("#message", "from the picker")
            page.press("#message", "Enter")
            bubble = page.locator("#messages .message.assistant").last
            expect(bubble).to_have_text("Echo from openai: from the picker")
            expect(bubble).to_have_attribute("data-label", f"Local llama.cpp · {LOCAL_MODELS[1]}")
        finally:
            browser.close()
    (record,) = completions(fake, "openai")
    assert record["body"]["model"] == LOCAL_MODELS[1] and "authorization" not in record["headers"]
