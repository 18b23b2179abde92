"""What the official SDKs would send: base URL and headers, taken from the SDK clients themselves.

(A top-level module, not in providers/, so that `pwachat serve`'s supervisor process can use it
without importing the app.)

The `openai` and `anthropic` SDKs stay the source of truth for client configuration and auth
conventions (default base URL, how the key is sent, the API version, identification headers), but
importing them costs a worker about 70 MB of memory that the hot path never uses. So `pwachat serve`
asks them once, in a short-lived subprocess (`python -m pwachat.sdk_config`), and hands the
answer to the workers in `PWACHAT_SDK_CONFIG`; a worker without it (tests building the app in
process) asks the SDKs itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from pwachat.settings import ConfigError, ProviderSpec, Settings

__all__ = ["ENV_VAR", "SdkConfig", "config_for_workers", "load", "read_sdk_config"]

ENV_VAR = "PWACHAT_SDK_CONFIG"

SdkConfig = dict[str, dict[str, Any]]  # provider -> {"base_url": str, "headers": {name: value}}

#: The SDK needs a key to make a client; a provider without one gets this, and no auth header.
_NO_KEY = "unused"
#: What an OpenAI client takes from OPENAI_ORG_ID / OPENAI_PROJECT_ID: the OpenAI account's own,
#: never sent to a custom provider. Nor is any credential but the provider's own N_API_KEY
#: (OPENAI_CUSTOM_HEADERS / ANTHROPIC_CUSTOM_HEADERS may hold one).
_VENDOR_ONLY = frozenset({"openai-organization", "openai-project", "authorization", "x-api-key"})


def _headers(client: Any, key: str | None, builtin: bool) -> dict[str, str]:
    # `Omit` placeholders (unset optional headers) are not strings and are dropped.
    headers = {k: v for k, v in client.default_headers.items() if isinstance(v, str)}
    if not builtin:
        headers = {k: v for k, v in headers.items() if k.lower() not in _VENDOR_ONLY}
    if key:
        headers.update(client.auth_headers)
    return headers


def _openai(spec: ProviderSpec) -> dict[str, Any]:
    import openai

    key = spec.api_key
    with openai.OpenAI(api_key=key or _NO_KEY, base_url=spec.base_url) as client:
        return {"base_url": str(client.base_url), "headers": _headers(client, key, spec.builtin)}


def _anthropic(spec: ProviderSpec) -> dict[str, Any]:
    import anthropic

    # An explicit key (even the placeholder) keeps the SDK from reading ANTHROPIC_API_KEY and the
    # like from the environment: a keyless provider must not be sent Anthropic's key.
    key = spec.api_key
    with anthropic.Anthropic(api_key=key or _NO_KEY, base_url=spec.base_url) as client:
        return {"base_url": str(client.base_url), "headers": _headers(client, key, spec.builtin)}


#: The SDK that says how to talk to a provider of each wire format.
_READERS = {"openai": _openai, "anthropic": _anthropic}


def read_sdk_config(settings: Settings) -> SdkConfig:
    """Ask the SDK client of each provider that can serve over HTTP for its base URL and headers."""
    return {
        spec.name: _READERS[spec.format](spec)
        for spec in settings.providers
        if spec.format in _READERS and settings.provider_configured(spec.name)
    }


def config_for_workers(settings: Settings) -> str | None:
    """The JSON for `PWACHAT_SDK_CONFIG`, computed in a subprocess; None with no real provider."""
    if not settings.needs_sdk:
        return None
    done = subprocess.run(
        [sys.executable, "-m", "pwachat.sdk_config"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != ENV_VAR},
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        raise ConfigError(
            "provider SDKs: could not read their client configuration (are openai/anthropic installed?)"
        )
    return done.stdout.strip()


def load(settings: Settings) -> SdkConfig:
    """The SDK configuration handed down by `pwachat serve`, or asked of the SDKs here."""
    if settings.provider_sdk_config:
        return json.loads(settings.provider_sdk_config)
    return read_sdk_config(settings)


if __name__ == "__main__":
    print(json.dumps(read_sdk_config(Settings.from_env())))
