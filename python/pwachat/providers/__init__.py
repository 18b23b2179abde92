"""The providers this process can serve, and how a request's `provider` / `model` pick one."""

from __future__ import annotations

import importlib

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
from pwachat.settings import ProviderSpec, Settings

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


class Providers:
    """Every known provider by canonical name; `serving` are those that can answer now.

    Everything comes from the settings' provider table (`Settings.providers`), read once here into
    dictionaries: a request costs a lookup or two, whatever the number of providers.
    """

    def __init__(self, settings: Settings, serving: dict[str, Provider]) -> None:
        self.settings = settings
        self.serving = serving
        self.default = settings.default_provider if settings.default_provider in serving else None
        self.specs: dict[str, ProviderSpec] = {spec.name: spec for spec in settings.providers}
        self.models = settings.provider_models
        self.labels = {name: spec.label for name, spec in self.specs.items()}
        # `echo` switched off is not a provider at all for clients (400 unknown_provider); the others
        # are known whether they serve or not (a built-in without its key: 503 not configured).
        known = {name for name, spec in self.specs.items() if spec.format != "echo" or name in serving}
        self.aliases = {alias: name for alias, name in settings.provider_aliases.items() if name in known}
        self.offered = {name: frozenset(self.models[name]) for name in known}
        # model id -> the provider a request naming only the model goes to: the first in the table's
        # order that offers it, those that can serve first (two servers may well offer the same model).
        self.by_model: dict[str, str] = {}
        for name in sorted((n for n in self.specs if n in known), key=lambda n: n not in serving):
            for model in self.models[name]:
                self.by_model.setdefault(model, name)

    def known(self, name: str) -> bool:
        return name in self.offered

    def resolve(self, provider: str | None, model: str | None) -> tuple[str | None, str | None]:
        """The canonical provider name and the model a request names (None: the default).

        Raises the 400s (`unknown_provider`, `unknown_model`); whether the provider can serve is
        asked later, after the rate limit (`not_configured`). None as the name: no provider at all.
        """
        if provider is not None:
            name = self.aliases.get(provider.lower())
            if name is None:
                raise UnknownProvider()
        elif model is not None:
            name = self.by_model.get(model)
            if name is None:
                raise UnknownModel()
        else:
            name = self.default
        if name is not None and model is not None and model not in self.offered[name]:
            raise UnknownModel("Unknown model for this provider; see /api/models for the ones offered")
        return name, model

    def not_configured(self, name: str | None) -> ProviderNotConfigured:
        if name is None:
            return ProviderNotConfigured()
        return ProviderNotConfigured(f"{self.labels[name]} API key not configured")

    async def aclose(self) -> None:
        for provider in self.serving.values():
            await provider.aclose()


def _factory(path: str) -> type:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_providers(settings: Settings) -> Providers:
    """Make one provider object per provider that can serve, from the table; called in the app's
    lifespan, closed at shutdown."""
    serving: dict[str, Provider] = {}
    # Imported only when needed: an echo-only server never loads the HTTP client or the SDK hand-off.
    sdk = None
    if settings.needs_sdk:
        from pwachat import sdk_config

        sdk = sdk_config.load(settings)
    for spec in settings.providers:
        if not settings.provider_configured(spec.name):
            continue
        # The HTTP formats get the base URL and headers their SDK would use (pwachat/sdk_config.py).
        connection = sdk[spec.name] if sdk is not None and spec.format != "echo" else {}
        serving[spec.name] = _factory(spec.factory)(settings, spec=spec, **connection)
    return Providers(settings, serving)
