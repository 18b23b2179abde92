"""The provider table (`Settings.providers`): built-ins and PROVIDERS entries read from the settings,
and what each reader of the table makes of it (selection, /api/models, /api/health, the SDK
hand-off, the metrics label sets). In process; no request leaves the host."""

from __future__ import annotations

import json

import pytest

from pwachat import sdk_config
from pwachat.errors import UnknownModel, UnknownProvider
from pwachat.metrics import Layout
from pwachat.providers import Providers
from pwachat.settings import BUILTIN_PROVIDERS, PROVIDER_ALIASES, ConfigError, Settings

NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing here is sent
LOCAL = {"PROVIDERS": "local", "LOCAL_BASE_URL": NOWHERE + "/v1", "LOCAL_MODELS": "llama3.2, qwen2.5"}


def load(*base: dict[str, str], **env: str) -> Settings:
    merged = {k: v for b in base for k, v in b.items()}
    return Settings.from_mapping({"LOG_FILE": "", **merged, **env})


def names(s: Settings) -> list[str]:
    return [spec.name for spec in s.providers]


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def test_without_providers_the_table_is_the_built_ins() -> None:
    s = load()
    assert names(s) == ["openai", "claude", "echo"] == [spec.name for spec in BUILTIN_PROVIDERS]
    assert PROVIDER_ALIASES == {"openai": "openai", "claude": "claude", "anthropic": "claude", "echo": "echo"}
    assert s.provider_aliases == PROVIDER_ALIASES
    assert [s.provider(n).label for n in names(s)] == ["OpenAI", "Anthropic", "Echo (offline)"]
    # The defaults of a Settings made in code are the same table.
    assert Settings().providers == BUILTIN_PROVIDERS


def test_providers_entries_go_before_echo_with_their_variables() -> None:
    s = load(
        LOCAL,
        PROVIDERS="local, groq",
        GROQ_BASE_URL="https://api.groq.example/openai/v1/",
        GROQ_MODELS="llama-3.3-70b",
        GROQ_API_KEY="gsk-test",
        GROQ_LABEL="Groq",
        GROQ_FORMAT="OpenAI",
    )
    assert names(s) == ["openai", "claude", "local", "groq", "echo"]
    local, groq = s.provider("local"), s.provider("groq")
    assert (local.label, local.format, local.models, local.api_key) == (
        "local",
        "openai",
        ("llama3.2", "qwen2.5"),
        None,
    )
    assert (groq.label, groq.format, groq.api_key) == ("Groq", "openai", "gsk-test")
    assert groq.base_url == "https://api.groq.example/openai/v1"  # trailing / dropped, as for the built-ins
    assert not local.builtin and not local.key_required
    assert s.provider_models["groq"] == ("llama-3.3-70b",)


def test_the_anthropic_format_is_served_by_the_anthropic_provider() -> None:
    s = load(PROVIDERS="relay", RELAY_BASE_URL=NOWHERE, RELAY_MODELS="r1", RELAY_FORMAT="anthropic")
    relay, claude = s.provider("relay"), s.provider("claude")
    assert (relay.format, relay.factory) == ("anthropic", claude.factory)


def test_variables_of_a_provider_not_named_in_providers_are_ignored() -> None:
    assert names(load(LOCAL_BASE_URL="not even a url", LOCAL_MODELS="m")) == ["openai", "claude", "echo"]


def test_the_first_that_can_serve_is_the_default_and_echo_is_the_last_resort() -> None:
    assert load(LOCAL).default_provider == "local"
    assert load(LOCAL, OPENAI_API_KEY="sk").default_provider == "openai"
    assert load(LOCAL, DEFAULT_PROVIDER="echo").default_provider == "echo"
    assert load(LOCAL, DEFAULT_PROVIDER="LOCAL").default_provider == "local"
    with pytest.raises(ConfigError, match="DEFAULT_PROVIDER"):
        load(DEFAULT_PROVIDER="local")  # not named in PROVIDERS


# --------------------------------------------------------------------------------------------
# Who can serve without a key
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "serves"),
    [
        ({}, False),  # the public API needs a key, as always
        ({"OPENAI_API_KEY": "sk"}, True),
        ({"OPENAI_BASE_URL": "https://vllm.internal.example/v1"}, False),  # not this host: a key, as before
        ({"OPENAI_BASE_URL": "http://127.0.0.1:8080/v1"}, True),  # llama.cpp, vLLM, Ollama on this host
        ({"OPENAI_BASE_URL": "http://localhost:11434/v1"}, True),
        ({"OPENAI_BASE_URL": "http://[::1]:8000/v1"}, True),
        ({"OPENAI_BASE_URL": "http://127.8.9.10:8000/v1"}, True),
        ({"OPENAI_BASE_URL": "http://localhost.example.com/v1"}, False),
    ],
)
def test_a_built_in_without_a_key_serves_only_from_this_host(env: dict[str, str], serves: bool) -> None:
    s = load(**env)
    assert s.provider_configured("openai") is serves
    assert (s.default_provider == "openai") is serves


def test_a_custom_provider_needs_no_key_wherever_it_is() -> None:
    s = load(PROVIDERS="remote", REMOTE_BASE_URL="https://llm.example/v1", REMOTE_MODELS="m")
    assert s.provider_configured("remote") and s.needs_sdk


def test_echo_only_needs_no_sdk() -> None:
    assert not load().needs_sdk
    assert load(ECHO_PROVIDER="off").default_provider is None


# --------------------------------------------------------------------------------------------
# Bad values stop start-up in one line naming the variable
# --------------------------------------------------------------------------------------------

BAD = [
    ("PROVIDERS", {"PROVIDERS": "Local"}),
    ("PROVIDERS", {"PROVIDERS": "_local"}),
    ("PROVIDERS", {"PROVIDERS": "local.lan"}),
    ("PROVIDERS", {"PROVIDERS": "l" * 33}),
    ("PROVIDERS", {"PROVIDERS": "openai"}),
    ("PROVIDERS", {"PROVIDERS": "claude"}),
    ("PROVIDERS", {"PROVIDERS": "anthropic"}),
    ("PROVIDERS", {"PROVIDERS": "echo"}),
    ("PROVIDERS", {"PROVIDERS": "local,local"}),
    ("LOCAL_BASE_URL", {"LOCAL_BASE_URL": ""}),
    ("LOCAL_BASE_URL", {"LOCAL_BASE_URL": "localhost:8080"}),
    ("LOCAL_BASE_URL", {"LOCAL_BASE_URL": "https://user:hunter2@llm.example:port/v1"}),
    ("LOCAL_BASE_URL", {"LOCAL_BASE_URL": "http://:8080/v1"}),
    ("LOCAL_MODELS", {"LOCAL_MODELS": ""}),
    ("LOCAL_MODELS", {"LOCAL_MODELS": " ,, "}),
    ("LOCAL_FORMAT", {"LOCAL_FORMAT": "gemini"}),
    ("LOCAL_FORMAT", {"LOCAL_FORMAT": "echo"}),
]


@pytest.mark.parametrize(("name", "env"), BAD, ids=[f"{n}={next(iter(e.values()))}" for n, e in BAD])
def test_bad_provider_settings_stop_start_up_naming_the_variable(name: str, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load(LOCAL, env)
    message = str(info.value)
    assert message.startswith(f"{name}: "), message
    assert "\n" not in message and len(message) < 300
    assert "hunter2" not in message


def test_a_name_may_have_32_characters() -> None:
    name = "l" * 32
    env = {"PROVIDERS": name, f"{name.upper()}_BASE_URL": NOWHERE, f"{name.upper()}_MODELS": "m"}
    assert names(load(**env))[2] == name


# --------------------------------------------------------------------------------------------
# Selection (what /api/chat does with `provider` and `model`)
# --------------------------------------------------------------------------------------------


def providers(s: Settings, serving: tuple[str, ...]) -> Providers:
    return Providers(s, {name: object() for name in serving})  # type: ignore[misc]


def test_a_custom_provider_is_picked_by_name_in_any_case_or_by_its_model() -> None:
    s = load(LOCAL)
    p = providers(s, ("local", "echo"))
    assert p.resolve("local", None) == ("local", None)
    assert p.resolve("LoCaL", "qwen2.5") == ("local", "qwen2.5")
    assert p.resolve(None, "qwen2.5") == ("local", "qwen2.5")
    assert p.resolve(None, None) == ("local", None)
    for provider, model in (("local", "gpt-4o-mini"), ("local", "echo"), (None, "mistral")):
        with pytest.raises(UnknownModel):
            p.resolve(provider, model)
    with pytest.raises(UnknownProvider):
        p.resolve("groq", None)


def test_a_model_two_providers_offer_goes_to_the_one_that_can_serve() -> None:
    # OpenAI (no key) lists gpt-4o-mini by default; a LiteLLM proxy serving it too gets it.
    s = load(PROVIDERS="litellm", LITELLM_BASE_URL=NOWHERE, LITELLM_MODELS="gpt-4o-mini")
    assert providers(s, ("litellm", "echo")).resolve(None, "gpt-4o-mini") == ("litellm", "gpt-4o-mini")
    # Both serving: the first in the table.
    s = load(PROVIDERS="litellm", LITELLM_BASE_URL=NOWHERE, LITELLM_MODELS="gpt-4o-mini", OPENAI_API_KEY="k")
    assert providers(s, ("openai", "litellm")).resolve(None, "gpt-4o-mini") == ("openai", "gpt-4o-mini")


def test_not_configured_names_the_providers_label() -> None:
    p = providers(load(LOCAL), ("local",))
    assert p.not_configured("openai").message == "OpenAI API key not configured"
    assert p.not_configured("claude").message == "Anthropic API key not configured"


# --------------------------------------------------------------------------------------------
# The routes, in process
# --------------------------------------------------------------------------------------------


def test_models_and_health_list_custom_providers_with_their_labels(make_client) -> None:
    client = make_client(
        **{**LOCAL, "PROVIDERS": "local,relay"},
        LOCAL_LABEL="Ollama (this machine)",
        RELAY_BASE_URL=NOWHERE,
        RELAY_FORMAT="anthropic",
        RELAY_API_KEY="sk-relay-secret",
        RELAY_MODELS="r-1",
    )
    body = client.get("/api/models").json()
    assert body["default_provider"] == "local"
    assert [(m["provider"], m["id"], m["default"], m["label"]) for m in body["models"]] == [
        ("local", "llama3.2", True, "Ollama (this machine)"),
        ("local", "qwen2.5", False, "Ollama (this machine)"),
        ("relay", "r-1", True, "relay"),
        ("echo", "echo", True, "Echo (offline)"),
    ]
    health = client.get("/api/health").json()
    assert health["status"] == "ok"  # a custom provider is a real one
    assert health["providers"]["local"] == {"configured": True, "models": 2, "status": "ok"}
    assert health["providers"]["relay"] == {"configured": True, "models": 1, "status": "ok"}
    assert list(health["providers"]) == ["openai", "claude", "local", "relay", "echo"]
    for path in ("/api/models", "/api/health"):
        assert "sk-relay-secret" not in client.get(path).text


def test_built_in_providers_are_labelled_in_models_too(make_client) -> None:
    client = make_client(OPENAI_API_KEY="sk-x", OPENAI_BASE_URL=NOWHERE, OPENAI_MODELS="o-1")
    labels = {m["provider"]: m["label"] for m in client.get("/api/models").json()["models"]}
    assert labels == {"openai": "OpenAI", "echo": "Echo (offline)"}


# --------------------------------------------------------------------------------------------
# The SDK hand-off: each HTTP provider configured as its format's SDK would be
# --------------------------------------------------------------------------------------------


def test_a_keyless_provider_gets_the_sdks_headers_and_no_credential(monkeypatch) -> None:
    # Even with the vendors' own keys in the environment, where the SDKs would look for them.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-openai")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-env-anthropic")
    s = load(
        LOCAL,
        PROVIDERS="local,relay",
        RELAY_BASE_URL=NOWHERE,
        RELAY_FORMAT="anthropic",
        RELAY_MODELS="r-1",
    )
    got = sdk_config.read_sdk_config(s)
    assert set(got) == {"local", "relay"}
    assert got["local"]["base_url"].rstrip("/") == NOWHERE + "/v1"
    assert got["relay"]["base_url"].rstrip("/") == NOWHERE
    for name in ("local", "relay"):
        headers = {k.lower(): v for k, v in got[name]["headers"].items()}
        assert "authorization" not in headers and "x-api-key" not in headers, name
        assert "sk-env" not in json.dumps(headers)
        assert headers["user-agent"]
    assert "anthropic-version" in {k.lower() for k in got["relay"]["headers"]}


def test_a_custom_provider_sends_its_own_key_and_nothing_of_the_vendors_account(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_ORG_ID", "org-of-the-openai-account")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "Authorization: Bearer sk-ambient")
    s = load(LOCAL, LOCAL_API_KEY="sk-local", OPENAI_API_KEY="sk-openai")
    got = sdk_config.read_sdk_config(s)
    local = {k.lower(): v for k, v in got["local"]["headers"].items()}
    assert local["authorization"] == "Bearer sk-local"
    assert "openai-organization" not in local and "sk-ambient" not in json.dumps(local)
    # The built-in OpenAI is configured as its SDK says, the environment's account included.
    openai_headers = {k.lower(): v for k, v in got["openai"]["headers"].items()}
    assert openai_headers.get("openai-organization") == "org-of-the-openai-account"


def test_a_built_in_on_this_host_without_a_key_gets_no_credential() -> None:
    s = load(OPENAI_BASE_URL=NOWHERE + "/v1")
    got = sdk_config.read_sdk_config(s)
    assert set(got) == {"openai"}
    assert "authorization" not in {k.lower() for k in got["openai"]["headers"]}
    assert sdk_config.config_for_workers(load()) is None  # echo only: no subprocess


# --------------------------------------------------------------------------------------------
# Metrics: the label sets come from the same table
# --------------------------------------------------------------------------------------------


def test_custom_providers_and_their_models_are_in_the_metrics_label_sets() -> None:
    layout = Layout(load(LOCAL))
    duration = layout.families["gen_ai_client_operation_duration_seconds"]
    assert ("local", "qwen2.5", "") in duration.index
    errors = layout.families["pwachat_upstream_errors_total"]
    assert any(labels[0] == "local" for labels in errors.index)
    # Only the configured fallback pairs (N_FALLBACK): a request moves nowhere else.
    assert Layout(load(LOCAL)).families["pwachat_provider_fallbacks_total"].series == ()
    layout = Layout(load(LOCAL, LOCAL_FALLBACK="echo", OPENAI_FALLBACK="local:qwen2.5"))
    fallbacks = layout.families["pwachat_provider_fallbacks_total"]
    assert fallbacks.series == (("openai", "local"), ("local", "echo"))
