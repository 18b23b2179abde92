"""Small pure-Python references for the native extension.

They serve twice: the property tests compare `pwachat._native` against them, and
the benches use them as the plain Python a developer would otherwise write.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import deque
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------
# SSE
# --------------------------------------------------------------------------------------------

# WHATWG splits on CRLF, CR and LF only; str.splitlines would also split on \v, \x1c, U+2028...
_LINE_END = re.compile(r"\r\n|\r|\n")


def sse_encode(data: str, *, id: int | str | None = None, event: str | None = None) -> bytes:
    """The framing a developer would write by hand (same output as the native encoder)."""
    for value in (id, event):
        if value is not None and any(c in str(value) for c in "\r\n\0"):
            raise ValueError("SSE field contains CR, LF or NUL")
    head = "" if id is None else f"id: {id}\n"
    if event is not None:
        head += f"event: {event}\n"
    body = "".join(f"data: {line}\n" for line in _LINE_END.split(data))
    return (head + body + "\n").encode()


def sse_delta(event_id: int, content: str) -> bytes:
    """The obvious Python for one delta frame: json.dumps inside an f-string."""
    payload = json.dumps({"content": content}, ensure_ascii=False, separators=(",", ":"))
    return f"id: {event_id}\nevent: delta\ndata: {payload}\n\n".encode()


@dataclass(frozen=True)
class SseMessage:
    type: str
    data: str
    last_event_id: str


def parse_sse(stream: bytes) -> tuple[list[SseMessage], list[str]]:
    """A parser that follows the WHATWG "event stream interpretation" step by step.

    Returns the dispatched events and the comment lines (without the colon). An event not
    ended by a blank line is discarded at the end of the stream, as the spec says.
    """
    text = stream.decode("utf-8")
    text = text.removeprefix("\ufeff")
    lines = _LINE_END.split(text)
    # The last piece has no line end after it: an incomplete line, discarded.
    lines.pop()
    events: list[SseMessage] = []
    comments: list[str] = []
    data = ""
    event_type = ""
    last_id = ""
    for line in lines:
        if line == "":
            # Dispatch.
            if data == "":
                event_type = ""
                continue
            data = data.removesuffix("\n")
            events.append(SseMessage(event_type or "message", data, last_id))
            data = ""
            event_type = ""
            continue
        if line.startswith(":"):
            comments.append(line[1:].removeprefix(" "))
            continue
        field, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if field == "event":
            event_type = value
        elif field == "data":
            data += value + "\n"
        elif field == "id" and "\0" not in value:
            last_id = value
        # "retry" and unknown fields do not matter here.
    return events, comments


# --------------------------------------------------------------------------------------------
# Sanitising
# --------------------------------------------------------------------------------------------

# Unicode's White_Space property, which the native side uses (Rust's char::is_whitespace).
# Python's str.strip() also strips U+001C..U+001F, but those are removed as controls before
# trimming, so on sanitised text the two agree; naming the set keeps the reference honest.
WHITE_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + ("\u2028\u2029\u202f\u205f\u3000")
)
_REMOVED = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class SanitizeRefusal(ValueError):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(index, reason)
        self.index = index
        self.reason = reason


def sanitize(text: str, index: int = -1) -> str:
    if _SURROGATE.search(text):
        raise SanitizeRefusal(index, "lone_surrogate")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _REMOVED.sub("", text)
    text = unicodedata.normalize("NFC", text)
    return text.strip(WHITE_SPACE)


def sanitize_chat(message: str, history: list[str], max_chars: int) -> tuple[str, list[str]]:
    def item(text: str, index: int) -> str:
        clean = sanitize(text, index)
        if not clean:
            raise SanitizeRefusal(index, "empty")
        if len(clean) > max_chars:
            raise SanitizeRefusal(index, "too_long")
        return clean

    return item(message, -1), [item(text, i) for i, text in enumerate(history)]


# --------------------------------------------------------------------------------------------
# Rate limiting
# --------------------------------------------------------------------------------------------


def now_ms(now: float) -> int:
    # The same float operation as the Rust side: floor(now * 1000.0).
    return math.floor(now * 1000.0)


class SlidingLog:
    """Exact sliding-window limiter: keeps every admitted timestamp (in ms)."""

    def __init__(self, windows: list[tuple[int, int]]) -> None:
        self.windows = windows
        self.log: dict[str, deque[int]] = {}

    def count(self, key: str, start_ms: int, end_ms: int) -> int:
        """Admitted requests with start_ms <= t < end_ms."""
        return sum(1 for t in self.log.get(key, ()) if start_ms <= t < end_ms)

    def record(self, key: str, t_ms: int) -> None:
        """Logs an admission decided elsewhere (the bound tests log what the native admitted)."""
        self.log.setdefault(key, deque()).append(t_ms)

    def check(self, key: str, now: float) -> bool:
        t = now_ms(now)
        log = self.log.setdefault(key, deque())
        longest = max(w for _, w in self.windows) * 1000
        while log and log[0] <= t - longest:
            log.popleft()
        if all(self.count(key, t - w * 1000 + 1, t + 1) + 1 <= limit for limit, w in self.windows):
            log.append(t)
            return True
        return False


@dataclass(frozen=True)
class RefWindow:
    limit: int
    window_s: int
    remaining: int
    reset_s: int


@dataclass(frozen=True)
class RefDecision:
    allowed: bool
    retry_after: int
    windows: list[RefWindow]

    @property
    def tightest(self) -> RefWindow:
        return min(self.windows, key=lambda w: (w.remaining, w.window_s))


class SlidingWindowCounter:
    """The same sliding-window-counter algorithm as rust/src/limiter.rs, in plain Python.

    Integer milliseconds throughout, so its decisions can be compared exactly with the
    native one (see limiter.rs for the algorithm and its bound).
    """

    def __init__(self, windows: list[tuple[int, int]]) -> None:
        self.windows = [(limit, w * 1000) for limit, w in windows]
        # key -> one [bucket, prev, cur] per window
        self.state: dict[str, list[list[int]]] = {}

    def _views(self, key: str, t: int) -> list[tuple[int, int, int, int]]:
        counters = self.state.get(key)
        views = []
        for i, (_, w) in enumerate(self.windows):
            bucket = t // w
            if counters is None:
                views.append((bucket, t - bucket * w, 0, 0))
                continue
            c_bucket, prev, cur = counters[i]
            if bucket < c_bucket:  # clock went back: the latest bucket, at its start
                views.append((c_bucket, 0, prev, cur))
                continue
            gap = bucket - c_bucket
            if gap == 1:
                prev, cur = cur, 0
            elif gap > 1:
                prev, cur = 0, 0
            views.append((bucket, t - bucket * w, prev, cur))
        return views

    @staticmethod
    def _wait_ms(limit: int, w: int, e: int, prev: int, cur: int) -> int:
        if prev * (w - e) + (cur + 1) * w <= limit * w:
            return 0
        if cur < limit:
            return w - ((limit - 1 - cur) * w) // prev - e
        return (w - e) + w - ((limit - 1) * w) // cur

    def _decide(self, key: str, now: float, consume: bool) -> RefDecision:
        t = now_ms(now)
        views = self._views(key, t)
        allowed = all(
            prev * (w - e) + (cur + 1) * w <= limit * w
            for (limit, w), (_, e, prev, cur) in zip(self.windows, views, strict=True)
        )
        if allowed and consume:
            views = [(b, e, prev, cur + 1) for b, e, prev, cur in views]
            self.state[key] = [[b, prev, cur] for b, _, prev, cur in views]
        out = []
        longest = 0
        for (limit, w), (_, e, prev, cur) in zip(self.windows, views, strict=True):
            wait = self._wait_ms(limit, w, e, prev, cur)
            longest = max(longest, wait)
            remaining = max(0, limit * w - prev * (w - e) - cur * w) // w
            out.append(RefWindow(limit, w // 1000, remaining, -(-wait // 1000)))
        retry_after = 0 if allowed else max(1, -(-longest // 1000))
        return RefDecision(allowed, retry_after, out)

    def check(self, key: str, now: float) -> RefDecision:
        return self._decide(key, now, consume=True)

    def peek(self, key: str, now: float) -> RefDecision:
        return self._decide(key, now, consume=False)
