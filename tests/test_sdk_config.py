"""The providers' base URLs and headers come from the official SDK clients (pwachat/sdk_config.py)."""

from __future__ import annotations

import json

import anthropic
import openai

from pwachat import sdk_config
from pwachat.settings import Settings

KEYS = {"OPENAI_API_KEY": "sk-sdk-openai", "ANTHROPIC_API_KEY": "sk-sdk-anthropic", "LOG_FILE": ""}


def sdk_view(client) -> dict[str, str]:
    headers = {k: v for k, v in client.default_headers.items() if isinstance(v, str)}
    return {**headers, **client.auth_headers}


def test_config_is_what_the_sdk_clients_send() -> None:
    got = sdk_config.read_sdk_config(Settings.from_mapping(KEYS))
    with (
        openai.OpenAI(api_key=KEYS["OPENAI_API_KEY"]) as oa,
        anthropic.Anthropic(api_key=KEYS["ANTHROPIC_API_KEY"]) as an,
    ):
        assert got["openai"] == {"base_url": str(oa.base_url), "headers": sdk_view(oa)}
        assert got["claude"] == {"base_url": str(an.base_url), "headers": sdk_view(an)}
    # The key goes where the SDK puts it, and Anthropic's API version travels with every request.
    assert KEYS["OPENAI_API_KEY"] in json.dumps(got["openai"]["headers"])
    assert "anthropic-version" in got["claude"]["headers"]


def test_base_urls_from_the_environment_are_used() -> None:
    settings = Settings.from_mapping(
        {**KEYS, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}
    )
    got = sdk_config.read_sdk_config(settings)
    assert got["openai"]["base_url"].rstrip("/") == "http://127.0.0.1:9/v1"
    assert got["claude"]["base_url"].rstrip("/") == "http://127.0.0.1:9"


def test_serve_hands_the_workers_what_a_subprocess_read_from_the_sdks(monkeypatch) -> None:
    # The subprocess reads the environment, as `pwachat serve` does; the workers get its JSON.
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(sdk_config.ENV_VAR, raising=False)
    settings = Settings.from_env(env_file=None)
    handoff = sdk_config.config_for_workers(settings)
    assert handoff is not None
    assert json.loads(handoff) == sdk_config.read_sdk_config(settings)
    # A worker given the hand-off uses it as it is.
    worker = Settings.from_mapping({**KEYS, sdk_config.ENV_VAR: handoff})
    assert sdk_config.load(worker) == json.loads(handoff)


def test_no_subprocess_without_a_real_provider() -> None:
    assert sdk_config.config_for_workers(Settings.from_mapping({"LOG_FILE": ""})) is None
