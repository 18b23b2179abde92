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

from pwachat.settings import ConfigError, Settings

__all__ = ["ENV_VAR", "SdkConfig", "config_for_workers", "load", "read_sdk_config"]

ENV_VAR = "PWACHAT_SDK_CONFIG"

SdkConfig = dict[str, dict[str, Any]]  # provider -> {"base_url": str, "headers": {name: value}}


def _headers(client: Any) -> dict[str, str]:
    # `Omit` placeholders (unset optional headers) are not strings and are dropped.
    headers = {k: v for k, v in client.default_headers.items() if isinstance(v, str)}
    headers.update(client.auth_headers)
    return headers


def read_sdk_config(settings: Settings) -> SdkConfig:
    """Ask the SDK clients of the configured providers for their base URL and headers."""
    config: SdkConfig = {}
    if settings.openai_api_key:
        import openai

        with openai.OpenAI(api_key=settings.openai_api_key, base_url=settings.openai_base_url) as client:
            config["openai"] = {"base_url": str(client.base_url), "headers": _headers(client)}
    if settings.anthropic_api_key:
        import anthropic

        with anthropic.Anthropic(
            api_key=settings.anthropic_api_key, base_url=settings.anthropic_base_url
        ) as c:
            config["claude"] = {"base_url": str(c.base_url), "headers": _headers(c)}
    return config


def config_for_workers(settings: Settings) -> str | None:
    """The JSON for `PWACHAT_SDK_CONFIG`, computed in a subprocess; None with no real provider."""
    if not (settings.openai_api_key or settings.anthropic_api_key):
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
