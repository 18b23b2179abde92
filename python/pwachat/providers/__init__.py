"""The providers this process can serve, how a request's `provider` / `model` pick one, and where
a failed request goes next (`N_FALLBACK`, the circuit breaker: contract, "Providers").

Fallback, resolved once at start-up into `Providers.fallbacks` (name -> `Fallback`), so that a
request pays one dict lookup, and for a provider that has one, a look at its breaker:
- A request that its provider fails before the stream is committed, with a failure worth trying
  elsewhere (`fallback_worthy`: connection refused or reset, a timeout, 429, 5xx, overloaded), is
  sent once to the fallback (its own model or the one named), with a fresh `UPSTREAM_TIMEOUT_S`.
  Never further: a fallback's own fallback is for requests that name it (no chains, no loops).
- The breaker (`Breaker`, per worker process): `BREAKER_FAILURES` such failures in a row open it,
  and for `PROVIDER_BREAKER_S` the provider is skipped straight to its fallback; then one request
  tries it again (half-open): an answer closes it, a failure opens it for another period. Any
  answer from the provider (a 400 as much as a 200) ends a run of failures: it is up.
- A provider without a fallback has no breaker: its failures reach the client as before.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Any

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
    UpstreamUnavailable,
)
from pwachat.settings import BREAKER_FAILURES, ProviderSpec, Settings

__all__ = [
    "Breaker",
    "ChatInput",
    "Completion",
    "Fallback",
    "Provider",
    "ProviderError",
    "ProviderStream",
    "Providers",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "build_providers",
    "fallback_worthy",
]


def fallback_worthy(err: BaseException) -> bool:
    """Whether a provider's failure is worth the fallback: a connection refused or reset, a
    timeout, a 429, a 5xx or an overloaded error (the providers raise `UpstreamUnavailable`,
    `UpstreamTimeout` or `UpstreamRateLimited` for those where they are made); not a request it
    refused (400, 401, 403, 404), nor an answer it could not make sense of, nor a failure of our
    own."""
    return isinstance(err, (UpstreamUnavailable, UpstreamTimeout, UpstreamRateLimited))


class Breaker:
    """One provider's circuit breaker, in this worker process (each worker learns on its own).

    `open_until` is 0.0 while it is closed, so that the check on every request is one attribute
    read; once open, it is when the next request may try the provider again. That request takes
    the next period for itself at once (the others keep going to the fallback), so a probe that
    never reports (its reader gone) costs one period, not a breaker stuck open."""

    __slots__ = ("failures", "open_until", "period")

    def __init__(self, period: float) -> None:
        self.period = period
        self.failures = 0  # fallback-worthy failures in a row
        self.open_until = 0.0

    def skips(self) -> bool:
        """Whether a request should go straight to the fallback now."""
        until = self.open_until
        if not until:
            return False
        now = time.monotonic()
        if now < until:
            return True
        self.open_until = now + self.period  # half-open: this request tries the provider
        return False

    @property
    def open(self) -> bool:
        """Open or half-open: not yet answered since it opened (health says `degraded`)."""
        return self.open_until != 0.0

    def record(self, err: BaseException | None) -> None:
        """The provider answered (`err` None, or a failure that is not its being down) or failed."""
        if err is None or not fallback_worthy(err):
            if self.failures:  # (open implies failures: closed, this is one read)
                self.failures = 0
                self.open_until = 0.0
            return
        self.failures += 1
        if self.failures >= BREAKER_FAILURES:
            self.open_until = time.monotonic() + self.period

    def settle(self, opening: Any) -> None:
        """A done-callback for a stream's opening task: its head arrived, or it failed."""
        if not opening.cancelled():  # the reader left: nothing learnt
            self.record(opening.exception())


@dataclass(slots=True, frozen=True)
class Fallback:
    """Where one provider's failed requests go: resolved from its `N_FALLBACK` at start-up."""

    source: str
    provider: Provider
    model: str
    breaker: Breaker  # the source's
    target_breaker: Breaker | None  # the fallback's own, when it has a fallback too
    header: tuple[bytes, bytes]  # X-Fallback-From: <source>


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
        # name -> its Fallback, for the serving providers that have one (the settings made sure
        # that the fallback of a provider that serves serves too); each has a breaker.
        self.breakers = {
            name: Breaker(settings.provider_breaker_s)
            for name, spec in self.specs.items()
            if spec.fallback is not None and name in serving
        }
        self.fallbacks: dict[str, Fallback] = {
            name: Fallback(
                source=name,
                provider=serving[to],
                model=model,
                breaker=breaker,
                target_breaker=self.breakers.get(to),
                header=(b"x-fallback-from", name.encode()),
            )
            for name, breaker in self.breakers.items()
            for to, model in (self.specs[name].fallback,)  # type: ignore[misc]
        }

    def degraded(self, name: str) -> bool:
        """Whether that provider's breaker is open (requests skip straight to its fallback)."""
        breaker = self.breakers.get(name)
        return breaker is not None and breaker.open

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
