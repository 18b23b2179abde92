"""Token budgets (contract, "Token budgets"): what a request reserves, and this process's view.

A request reserves its worst case before the provider is called: `cost` is the native input
estimate (`estimate_input_tokens`, an upper bound: UTF-8 bytes of every text plus 8 tokens per
message and 32 per request, rust/src/usage.rs) plus its `max_tokens`. The reservation is admitted
only if every budget on (the caller's `TOKENS_PER_DAY`, the deployment's `TOKENS_GLOBAL_PER_DAY`)
can cover it, and is then replaced by what the answer used (`Ticket`, settled once by the limiter
backend that admitted it: pwachat/ratelimit.py for one process, pwachat/redis_limiter.py with the
request limits in one script across processes).

`LocalBudgets` holds the native `TokenBudget`s of this process: the whole truth with `memory://`,
Redis's counts as of its last answer with Redis (`sync`), and the process's own while Redis is
away. The headers and the rate-limit route's `tokens` block come from the tighter of the two.
"""

from __future__ import annotations

from dataclasses import dataclass

from pwachat._native import BudgetDecision, Decision, RateLimiter, TokenBudget, estimate_input_tokens
from pwachat.errors import BudgetExceeded
from pwachat.providers import ChatInput
from pwachat.settings import Settings

__all__ = [
    "DAY_S",
    "GLOBAL_KEY",
    "Admission",
    "LocalBudgets",
    "Ticket",
    "Verdict",
    "admit_locally",
    "budget_headers",
    "cost",
]

DAY_S = 86400
#: The deployment's budget's one key (a caller key always has a `t:` or `ip:` prefix).
GLOBAL_KEY = ""


def cost(chat: ChatInput) -> int:
    """The tokens a request reserves: an upper bound on its input plus its `max_tokens`."""
    return estimate_input_tokens(chat.system, chat.history, chat.message) + chat.max_tokens


@dataclass(slots=True)
class Ticket:
    """An admitted reservation: `tokens` in `bucket` (the budgets' day bucket) for `key` (and for
    the deployment when it has a budget), until `settle` replaces it by what was used."""

    key: str
    tokens: int
    bucket: int
    settled: bool = False


@dataclass(slots=True)
class Verdict:
    """A budget check: `decision` is the tighter budget's (headers, refusal); `refused_by` is
    None when admitted, else "caller" or "global"."""

    decision: BudgetDecision
    refused_by: str | None = None


class LocalBudgets:
    """This process's budgets: the caller's and the deployment's, each off when its limit is 0."""

    def __init__(self, settings: Settings, max_keys: int = 100_000) -> None:
        self.caller_limit = settings.tokens_per_day
        self.global_limit = settings.tokens_global_per_day
        self.caller = TokenBudget(self.caller_limit, DAY_S, max_keys=max_keys) if self.caller_limit else None
        self.overall = TokenBudget(self.global_limit, DAY_S, max_keys=1) if self.global_limit else None
        self.on = self.caller is not None or self.overall is not None

    def peek(self, key: str, tokens: int = 1) -> Verdict | None:
        """Whether `tokens` more would fit now (None when budgets are off); reserves nothing."""
        mine = self.caller.peek(key, tokens=tokens) if self.caller is not None else None
        every = self.overall.peek(GLOBAL_KEY, tokens=tokens) if self.overall is not None else None
        return _tighter(mine, every)

    def reserve(self, key: str, tokens: int) -> tuple[Verdict, Ticket | None]:
        """Check both budgets, then reserve in both, or in neither (one process: nothing runs in
        between). `tokens` >= 1; budgets must be on."""
        if self.overall is None:  # one budget: its reserve is all or nothing by itself
            mine = self.caller.reserve(key, tokens)  # type: ignore[union-attr]
            if not mine.allowed:
                return Verdict(mine, "caller"), None
            return Verdict(mine), Ticket(key, tokens, mine.bucket)
        verdict = self.peek(key, tokens)
        assert verdict is not None
        if verdict.refused_by is not None:
            return verdict, None
        mine = self.caller.reserve(key, tokens) if self.caller is not None else None
        every = self.overall.reserve(GLOBAL_KEY, tokens) if self.overall is not None else None
        verdict = _tighter(mine, every)
        assert verdict is not None
        return verdict, Ticket(key, tokens, verdict.decision.bucket)

    def sync(
        self, key: str, now: float, counts: tuple[int, int, int, int], tokens: int, admitted: bool
    ) -> tuple[Verdict, Ticket | None]:
        """Redis's counts (caller prev, cur, global prev, cur, after its decision) in place of this
        process's, and the decision they make: for `tokens` more when Redis refused (for
        `retry_after`), for nothing more when it admitted (its counts hold the reservation)."""
        more = 0 if admitted else tokens
        mine = every = None
        if self.caller is not None:
            mine = self.caller.sync(key, now, counts[0], counts[1], tokens=more)
        if self.overall is not None:
            every = self.overall.sync(GLOBAL_KEY, now, counts[2], counts[3], tokens=more)
        verdict = _tighter(mine, every)
        assert verdict is not None
        if not admitted or tokens == 0:
            return verdict, None
        verdict.refused_by = None
        return verdict, Ticket(key, tokens, verdict.decision.bucket)

    def settle(self, ticket: Ticket, used: int) -> None:
        if self.caller is not None:
            self.caller.settle(ticket.key, ticket.bucket, ticket.tokens, used)
        if self.overall is not None:
            self.overall.settle(GLOBAL_KEY, ticket.bucket, ticket.tokens, used)

    @staticmethod
    def policy_item_of(settings: Settings) -> str:
        """The `"tokens"` item of RateLimit-Policy (the caller's budget; the deployment's when
        only that is on), or "" when budgets are off."""
        limit = settings.tokens_per_day or settings.tokens_global_per_day
        return f'"tokens";q={limit};w={DAY_S}' if limit else ""

    def refusal(self, verdict: Verdict, tokens: int) -> BudgetExceeded:
        d = verdict.decision
        whose = "The deployment's" if verdict.refused_by == "global" else "Your"
        if tokens > d.limit:
            message = (
                f"This request may use up to {tokens} tokens, more than the whole token budget "
                f"({d.limit} per day); send a shorter history or a smaller max_tokens"
            )
        else:
            message = f"{whose} token budget cannot cover this request ({d.limit} tokens per day)"
        headers = {k.decode(): v.decode() for k, v in budget_headers(d)}
        headers["Retry-After"] = str(max(1, d.retry_after))
        return BudgetExceeded(message, headers=headers)


def _tighter(mine: BudgetDecision | None, every: BudgetDecision | None) -> Verdict | None:
    """The decision that binds: a refusal first (the caller's before the deployment's), else the
    one with fewer tokens left."""
    if mine is None:
        return None if every is None else Verdict(every, None if every.allowed else "global")
    if every is None:
        return Verdict(mine, None if mine.allowed else "caller")
    if not mine.allowed:
        return Verdict(mine, "caller")
    if not every.allowed:
        return Verdict(every, "global")
    return Verdict(mine if mine.remaining <= every.remaining else every)


def budget_headers(decision: BudgetDecision) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-tokenbudget-limit", str(decision.limit).encode()),
        (b"x-tokenbudget-remaining", str(decision.remaining).encode()),
    ]


@dataclass(slots=True)
class Admission:
    """A request's admission: `decision` for the request limits (refused, or admitted when the
    budgets refused: then nothing was consumed), `budget` the tighter budget's verdict (None with
    budgets off or nothing to reserve), `ticket` the reservation to settle (None unless admitted
    with tokens reserved)."""

    decision: Decision
    budget: Verdict | None = None
    ticket: Ticket | None = None

    @property
    def allowed(self) -> bool:
        return self.decision.allowed and (self.budget is None or self.budget.refused_by is None)


def admit_locally(limiter: RateLimiter, budgets: LocalBudgets, key: str, tokens: int) -> Admission:
    """One process's admission: the limits first (their refusal wins), then the budgets, and only
    when both have room are both consumed (nothing runs in between)."""
    if tokens <= 0 or not budgets.on:
        return Admission(limiter.check(key))
    decision = limiter.peek(key)
    if not decision.allowed:
        return Admission(decision)
    verdict, ticket = budgets.reserve(key, tokens)
    if ticket is None:
        return Admission(decision, verdict)
    return Admission(limiter.check(key), verdict, ticket)
