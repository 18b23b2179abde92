"""Rate limiting: who the caller is, the backend that counts, and the headers that tell them.

The counting itself is the native sliding-window limiter (`pwachat._native.RateLimiter`): three
windows checked and consumed atomically, a refused request consuming nothing. `memory://` uses it
alone; a Redis backend plugs in behind the same `RateLimitBackend` interface. The backend also
admits a request's token reservation (pwachat/budgets.py) with its request limits, as one
decision: admitted only if the limits have room and every budget can cover it, and otherwise
nothing is consumed anywhere.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from pwachat._native import Decision, RateLimiter
from pwachat.budgets import Admission, LocalBudgets, Ticket, Verdict, admit_locally
from pwachat.errors import RateLimited
from pwachat.forwarded import rate_limit_address
from pwachat.settings import Settings

__all__ = [
    "WINDOW_NAMES",
    "MemoryBackend",
    "RateLimitBackend",
    "caller_key",
    "create_backend",
    "rate_limit_headers",
]

WINDOW_NAMES = {60: "minute", 3600: "hour", 86400: "day"}
WINDOW_NAMES_B = {w: n.encode() for w, n in WINDOW_NAMES.items()}


class RateLimitBackend(Protocol):
    name: str  # "memory" or "redis", as /api/health and /api/rate-limit report it
    budgets: LocalBudgets

    async def start(self) -> None:
        """Connect what needs connecting; never raises for an unreachable store."""

    async def hit(self, key: str) -> Decision:
        """Check and, when admitted, consume one request in every window."""

    async def admit(self, key: str, tokens: int) -> Admission:
        """`hit` and, with budgets on and `tokens` > 0, the reservation of `tokens` in every
        budget, as one decision: all or nothing."""

    def settle(self, ticket: Ticket, used: int) -> None:
        """Replace an admitted reservation by the tokens used (once; later calls do nothing)."""

    async def peek(self, key: str) -> Decision:
        """The caller's current state; consumes nothing."""

    async def view(self, key: str) -> tuple[Decision, Verdict | None]:
        """`peek`, with the caller's budget (None with budgets off)."""

    async def redis_state(self) -> str:
        """`disabled`, `ok` or `unavailable`, as of now (health checks ask this)."""

    async def aclose(self) -> None: ...


class MemoryBackend:
    """One process's limiter; exact within that process, nothing shared."""

    name = "memory"

    def __init__(self, settings: Settings, max_keys: int = 100_000) -> None:
        self.limiter = RateLimiter(settings.rate_windows, max_keys=max_keys)
        self.budgets = LocalBudgets(settings, max_keys=max_keys)

    async def start(self) -> None:
        return None

    async def hit(self, key: str) -> Decision:
        return self.limiter.check(key)

    async def admit(self, key: str, tokens: int) -> Admission:
        return admit_locally(self.limiter, self.budgets, key, tokens)

    def settle(self, ticket: Ticket, used: int) -> None:
        if not ticket.settled:
            ticket.settled = True
            self.budgets.settle(ticket, used)

    async def peek(self, key: str) -> Decision:
        return self.limiter.peek(key)

    async def view(self, key: str) -> tuple[Decision, Verdict | None]:
        return self.limiter.peek(key), self.budgets.peek(key)

    async def redis_state(self) -> str:
        return "disabled"

    async def aclose(self) -> None:
        return None


def create_backend(settings: Settings) -> RateLimitBackend:
    if settings.redis_url == "memory://":
        return MemoryBackend(settings)
    from pwachat.redis_limiter import RedisBackend

    return RedisBackend(settings)


def caller_key(client_ip: str, token: str | None) -> str:
    """The quota key: a token's digest (never the token itself, which may end up in Redis), or the
    address as one caller (`forwarded.rate_limit_address`: IPv4 as it is, IPv4-mapped IPv6 as
    IPv4, IPv6 by its /64)."""
    if token is not None:
        return "t:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    return "ip:" + rate_limit_address(client_ip)


def policy_header(settings: Settings) -> str:
    """RateLimit-Policy: the three windows, and the token budget's item when budgets are on."""
    items = [f'"{WINDOW_NAMES[w]}";q={q};w={w}' for q, w in settings.rate_windows]
    tokens = LocalBudgets.policy_item_of(settings)
    return ", ".join([*items, tokens] if tokens else items)


def rate_limit_headers(decision: Decision, policy: str) -> list[tuple[bytes, bytes]]:
    """The contract's rate-limit headers as raw ASGI pairs (the hot routes send them as they are)."""
    remaining = str(decision.remaining).encode()
    reset = str(decision.reset_s).encode()
    headers = [
        (b"x-ratelimit-limit", str(decision.limit).encode()),
        (b"x-ratelimit-remaining", remaining),
        (b"x-ratelimit-reset", reset),
        (b"ratelimit-policy", policy.encode()),
        (b"ratelimit", b'"' + WINDOW_NAMES_B[decision.window_s] + b'";r=' + remaining + b";t=" + reset),
    ]
    if not decision.allowed:
        headers.append((b"retry-after", str(decision.retry_after).encode()))
    return headers


def refusal(decision: Decision, policy: str) -> RateLimited:
    name = WINDOW_NAMES[decision.window_s]
    return RateLimited(
        f"Rate limit exceeded: {decision.limit} per 1 {name}",
        headers={k.decode(): v.decode() for k, v in rate_limit_headers(decision, policy)},
    )
