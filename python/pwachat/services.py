"""The per-process objects the routes use, made in the app's lifespan and kept on `app.state`."""

from __future__ import annotations

from dataclasses import dataclass

from pwachat.providers import Providers
from pwachat.ratelimit import RateLimitBackend
from pwachat.settings import Settings
from pwachat.streams import Streams

__all__ = ["Services"]


@dataclass(slots=True)
class Services:
    settings: Settings
    providers: Providers
    limiter: RateLimitBackend
    policy: str  # the RateLimit-Policy header, the same for every caller
    tokens: tuple[bytes, ...]  # accepted bearer tokens, encoded once
    streams: Streams  # this process's resumable streams
