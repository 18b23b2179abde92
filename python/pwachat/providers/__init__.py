"""The providers this process can serve, and how a request's `provider` / `model` pick one."""

from __future__ import annotations

from pwachat.errors import UnknownModel, UnknownProvider
from pwachat.providers.base import (
    ChatInput,
    Completion,
    Provider,
    ProviderError,
    ProviderNotConfigured,
    ProviderStream,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from pwachat.settings import PROVIDER_ALIASES, Settings

__all__ = [
    "ChatInput",
    "Completion",
    "Provider",
    "ProviderError",
    "ProviderStream",
    "Providers",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamTimeout",
    "build_providers",
]

LABELS = {"openai": "OpenAI", "claude": "Anthropic", "echo": "Echo (offline)"}


class Providers:
    """Every known provider by canonical name; `serving` are those that can answer now."""

    def __init__(self, settings: Settings, serving: dict[str, Provider]) -> None:
        self.settings = settings
        self.serving = serving
        self.default = settings.default_provider if settings.default_provider in serving else None
        self.models = settings.provider_models
        # model id -> the first serving provider offering it (a model never names two providers' ids)
        self.by_model: dict[str, str] = {}
        for name in ("openai", "claude", "echo"):
            for model in self.models[name]:
                self.by_model.setdefault(model, name)

    def known(self, name: str) -> bool:
        # `echo` switched off is not a provider at all for clients (400 unknown_provider).
        return name in ("openai", "claude") or (name == "echo" and self.settings.echo_provider)

    def resolve(self, provider: str | None, model: str | None) -> tuple[str | None, str | None]:
        """The canonical provider name and the model a request names (None: the default).

        Raises the 400s (`unknown_provider`, `unknown_model`); whether the provider can serve is
        asked later, after the rate limit (`not_configured`). None as the name: no provider at all.
        """
        if provider is not None:
            name = PROVIDER_ALIASES.get(provider.lower())
            if name is None or not self.known(name):
                raise UnknownProvider()
        elif model is not None:
            name = self.by_model.get(model)
            if name is None or not self.known(name):
                raise UnknownModel()
        else:
            name = self.default
        if name is not None and model is not None and model not in self.models[name]:
            raise UnknownModel("Unknown model for this provider; see /api/models for the ones offered")
        return name, model

    @staticmethod
    def not_configured(name: str | None) -> ProviderNotConfigured:
        if name is None:
            return ProviderNotConfigured()
        return ProviderNotConfigured(f"{LABELS[name]} API key not configured")

    async def aclose(self) -> None:
        for provider in self.serving.values():
            await provider.aclose()


def build_providers(settings: Settings) -> Providers:
    """Make one client per configured provider; called in the app's lifespan, closed at shutdown."""
    serving: dict[str, Provider] = {}
    if settings.openai_api_key or settings.anthropic_api_key:
        # Imported here: an echo-only server never needs the HTTP client or the SDK hand-off.
        from pwachat import sdk_config
        from pwachat.providers.anthropic import AnthropicProvider
        from pwachat.providers.openai import OpenAIProvider

        sdk = sdk_config.load(settings)
        if settings.openai_api_key:
            serving["openai"] = OpenAIProvider(settings, **sdk["openai"])
        if settings.anthropic_api_key:
            serving["claude"] = AnthropicProvider(settings, **sdk["claude"])
    if settings.echo_provider:
        from pwachat.providers.echo import EchoProvider

        serving["echo"] = EchoProvider()
    return Providers(settings, serving)
