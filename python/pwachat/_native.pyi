"""Stubs for the Rust extension (rust/src). Hand-written; checked with mypy.stubtest."""

from collections.abc import Sequence
from typing import Self, final

# The classes are built by PyO3's `#[new]`, i.e. `__new__`; writing the
# constructors as `__new__` is what stubtest checks against (as pydantic-core does).

__all__ = [
    "BudgetDecision",
    "Decision",
    "PanicException",
    "RateLimiter",
    "SanitizeError",
    "SseEncoder",
    "SseFieldError",
    "TokenBudget",
    "UpstreamFormatError",
    "UpstreamParser",
    "WindowState",
    "__version__",
    "estimate_input_tokens",
    "estimate_output_tokens",
    "sanitize",
    "sanitize_chat",
    "sse_comment",
    "sse_event",
]

__version__: str

class PanicException(BaseException):
    """A bug in the extension (a Rust panic), raised as PyO3 raises it; not an ``Exception``."""

class SseFieldError(ValueError):
    """An SSE id or event name contains CR, LF or NUL."""

class UpstreamFormatError(ValueError):
    """A provider stream is malformed: bad JSON, wrong shape, invalid UTF-8.

    ``str(err)`` names the provider and a line/column in the event data, never the body.
    """

class SanitizeError(ValueError):
    """A chat text was refused.

    ``index`` is -1 for the message and ``i`` for ``history[i]``; ``reason`` is
    ``"lone_surrogate"``, ``"empty"`` or ``"too_long"``. ``str(err)`` never
    echoes the text.
    """

    index: int
    reason: str

def sse_event(data: str | bytes, *, id: int | str | None = None, event: str | None = None) -> bytes: ...
def sse_comment(text: str = "ping") -> bytes: ...

@final
class SseEncoder:
    def __new__(cls, start_id: int = 0) -> Self: ...
    @property
    def next_id(self) -> int: ...
    def event(self, event: str, data: str | bytes) -> bytes: ...
    def delta(self, content: str) -> bytes: ...
    def deltas(self, contents: list[str]) -> bytes: ...

@final
class UpstreamParser:
    """Reads a provider's streamed body (``"openai"`` or ``"anthropic"``) as it arrives.

    ``feed`` returns the non-empty text deltas of the events the chunk completes and keeps
    an unfinished line for the next call; after the end marker or an in-stream ``error``
    (``done`` is then True) the rest is ignored. A malformed event raises
    ``UpstreamFormatError``, and so does every later ``feed``; when good events came before
    it in the same chunk, their deltas are returned first and ``failed`` turns True.
    """

    def __new__(cls, kind: str) -> Self: ...
    def feed(self, data: bytes) -> list[str]: ...
    @property
    def failed(self) -> bool: ...
    @property
    def done(self) -> bool: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def output_final(self) -> bool:
        """``output_tokens`` is the provider's final count (OpenAI's usage chunk, Anthropic's
        ``message_delta``), not ``message_start``'s placeholder."""
    @property
    def estimated_output_tokens(self) -> int:
        """``estimate_output_tokens`` of the text of every delta ``feed`` has returned, counted
        as they went by (no second pass, no crossing of its own)."""
    @property
    def error(self) -> tuple[str, str] | None: ...

def estimate_input_tokens(system: str, history: Sequence[tuple[str, str]], message: str) -> int:
    """An upper bound on the input tokens a provider counts for this request (history items are
    ``(role, content)``): the UTF-8 bytes of every text, plus 8 tokens per message for the chat
    template's role header and separators and 32 once for the begin-of-text token and the reply's
    header. Byte-level BPE tokenizers never make a token of less than one byte, so the bytes bound
    the tokens (rust/src/usage.rs says where the bound stops). Raises TypeError for anything but
    strings and 2-tuples of strings."""

def estimate_output_tokens(text: str) -> int:
    """An upper bound on the output tokens of an answer whose text is ``text``: its UTF-8 bytes
    plus 2 (the end-of-turn token, a leading piece that decodes to nothing)."""

def sanitize(text: str) -> str: ...
def sanitize_chat(message: str, history: list[str], max_chars: int) -> tuple[str, list[str]]: ...

@final
class WindowState:
    @property
    def limit(self) -> int: ...
    @property
    def window_s(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    @property
    def reset_s(self) -> int: ...

@final
class Decision:
    @property
    def allowed(self) -> bool: ...
    @property
    def limit(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    @property
    def reset_s(self) -> int: ...
    @property
    def retry_after(self) -> int: ...
    @property
    def window_s(self) -> int: ...
    @property
    def windows(self) -> list[WindowState]: ...

@final
class RateLimiter:
    def __new__(cls, windows: list[tuple[int, int]], *, max_keys: int = 100_000) -> Self: ...
    def check(self, key: str, now: float | None = None) -> Decision: ...
    def peek(self, key: str, now: float | None = None) -> Decision: ...
    def sync(self, key: str, now: float, counts: list[tuple[int, int]], allowed: bool) -> Decision: ...
    def __len__(self) -> int: ...

@final
class BudgetDecision:
    """What a ``TokenBudget`` reserve, peek or sync decided."""

    @property
    def allowed(self) -> bool: ...
    @property
    def limit(self) -> int: ...
    @property
    def remaining(self) -> int:
        """Tokens left (after this reservation, when admitted): ``floor(limit - estimate)``, >= 0."""
    @property
    def reset_s(self) -> int:
        """Whole seconds until one more token fits; 0 while one does."""
    @property
    def retry_after(self) -> int:
        """0 when admitted; else whole seconds (>= 1) until the tokens asked for fit, or the
        window's length when they never can (more than ``limit``: refuse those outright)."""
    @property
    def bucket(self) -> int:
        """The bucket the reservation went into (or would have): ``settle``'s ``bucket``."""

@final
class TokenBudget:
    """A sliding-window token budget per key (rust/src/budget.rs): epoch-aligned buckets of
    ``window_s``, the previous one fading linearly, as ``RateLimiter`` counts requests.

    ``now`` is seconds since the epoch (the system clock when None); NaN, infinities and
    negative values raise ValueError. Counts are integers below 2**64 and saturate there; a
    negative count or bucket out of range raises OverflowError. At most ``max_keys`` keys are
    held: a new one evicts the least recently used, whose counts are forgotten (it errs
    towards admitting), and keys whose both buckets have expired are dropped. Thread safe.
    """

    def __new__(cls, limit: int, window_s: int = 86400, *, max_keys: int = 100_000) -> Self:
        """ValueError unless ``1 <= limit < 2**63``, ``1 <= window_s <= 2**40`` and
        ``max_keys >= 1`` (a budget of 0 is no budget: turn budgets off instead)."""
    def reserve(self, key: str, tokens: int, now: float | None = None) -> BudgetDecision:
        """Admitted iff the estimate (previous bucket weighted + current) + ``tokens`` <= limit;
        then the current bucket counts them. A refused reserve changes no count."""
    def settle(self, key: str, bucket: int, reserved: int, used: int, now: float | None = None) -> None:
        """Replaces a reservation of ``reserved`` made in ``bucket`` (``BudgetDecision.bucket``)
        by ``used``: that bucket += used - reserved (not below 0) if it is still the current or
        the previous one; an older bucket no longer counts and nothing changes. Call it once per
        admitted reserve, with the tokens actually used (0 when nothing was produced)."""
    def peek(self, key: str, now: float | None = None, *, tokens: int = 1) -> BudgetDecision:
        """The decision ``reserve(key, tokens, now)`` would make, reserving nothing."""
    def sync(self, key: str, now: float, prev: int, cur: int, *, tokens: int = 0) -> BudgetDecision:
        """Writes a shared store's (Redis's) counts for the buckets ``now`` falls in in place of
        this process's, and returns the decision for ``tokens`` more on top of them: 0 after
        the store admitted a reservation (its counts include it), the refused tokens after it
        refused one (for ``retry_after``). Unlike ``RateLimiter.sync`` the store's counts win
        even when lower: other processes' settles lower them."""
    def charge(self, key: str, tokens: int, now: float | None = None) -> None:
        """Counts ``tokens`` in the current bucket without checking (reconciliation)."""
    def __len__(self) -> int: ...
