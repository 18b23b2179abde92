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
from collections.abc import Sequence
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


def window_wait_ms(limit: int, w: int, e: int, prev: int, cur: int, cost: int) -> int | None:
    """Milliseconds from `e` ms into a bucket of `w` ms until `cost` fits under `limit`, or None
    if it never does (rust/src/window.rs, which the limiter and the token budget share)."""
    if prev * (w - e) + (cur + cost) * w <= limit * w:
        return 0
    if cost > limit:
        return None
    if cur + cost <= limit:
        return w - ((limit - cost - cur) * w) // prev - e
    return (w - e) + w - ((limit - cost) * w) // cur


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
            wait = window_wait_ms(limit, w, e, prev, cur, 1) or 0
            longest = max(longest, wait)
            remaining = max(0, limit * w - prev * (w - e) - cur * w) // w
            out.append(RefWindow(limit, w // 1000, remaining, -(-wait // 1000)))
        retry_after = 0 if allowed else max(1, -(-longest // 1000))
        return RefDecision(allowed, retry_after, out)

    def check(self, key: str, now: float) -> RefDecision:
        return self._decide(key, now, consume=True)

    def peek(self, key: str, now: float) -> RefDecision:
        return self._decide(key, now, consume=False)


U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class RefBudgetDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int
    retry_after: int
    bucket: int


class TokenBudgetRef:
    """The token budget of rust/src/budget.rs in plain Python, key table included: keys in least
    recently used order (a dict's order), the expired dropped from the front on each write, the
    least recent evicted at `max_keys`, no key created for zero counts."""

    def __init__(self, limit: int, window_s: int, max_keys: int = 100_000) -> None:
        self.limit, self.window_s, self.w, self.max_keys = limit, window_s, window_s * 1000, max_keys
        # key -> (bucket, prev, cur, expires_ms), least recently used first
        self.keys: dict[str, tuple[int, int, int, int]] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def _view(self, key: str, t: int) -> list[int]:
        """[bucket, elapsed_ms, prev, cur] at `t`."""
        w, bucket = self.w, t // self.w
        if key not in self.keys:
            return [bucket, t - bucket * w, 0, 0]
        k_bucket, prev, cur, _ = self.keys[key]
        if bucket < k_bucket:  # the clock went back: the key's latest bucket, at its start
            return [k_bucket, 0, prev, cur]
        gap = bucket - k_bucket
        if gap == 1:
            prev, cur = cur, 0
        elif gap > 1:
            prev, cur = 0, 0
        return [bucket, t - bucket * w, prev, cur]

    def _fits(self, view: list[int], cost: int) -> bool:
        _, e, prev, cur = view
        return prev * (self.w - e) + (cur + cost) * self.w <= self.limit * self.w

    def _decision(self, view: list[int], allowed: bool, tokens: int) -> RefBudgetDecision:
        bucket, e, prev, cur = view
        w, limit = self.w, self.limit
        remaining = max(0, limit * w - prev * (w - e) - cur * w) // w
        reset = -(-(window_wait_ms(limit, w, e, prev, cur, 1) or 0) // 1000)
        retry_after = 0
        if not allowed:
            wait = window_wait_ms(limit, w, e, prev, cur, tokens)
            retry_after = max(1, self.window_s if wait is None else -(-wait // 1000))
        return RefBudgetDecision(allowed, limit, remaining, reset, retry_after, bucket)

    def _lookup(self, key: str, t: int) -> list[int]:
        while self.keys:
            front = next(iter(self.keys))
            if t < self.keys[front][3]:
                break
            del self.keys[front]
        return self._view(key, t)

    def _write(self, key: str, view: list[int]) -> None:
        bucket, _, prev, cur = view
        expires = (bucket + 2) * self.w
        if key in self.keys:
            expires = max(expires, self.keys.pop(key)[3])
        elif prev == cur == 0:
            return
        elif len(self.keys) >= self.max_keys:
            del self.keys[next(iter(self.keys))]
        self.keys[key] = (bucket, prev, cur, expires)

    def reserve(self, key: str, tokens: int, now: float) -> RefBudgetDecision:
        view = self._lookup(key, now_ms(now))
        allowed = self._fits(view, tokens)
        if allowed:
            view[3] += tokens
            self._write(key, view)
        elif key in self.keys:
            self.keys[key] = self.keys.pop(key)
        return self._decision(view, allowed, tokens)

    def peek(self, key: str, now: float, tokens: int = 1) -> RefBudgetDecision:
        view = self._view(key, now_ms(now))
        return self._decision(view, self._fits(view, tokens), tokens)

    def settle(self, key: str, bucket: int, reserved: int, used: int, now: float) -> None:
        view = self._lookup(key, now_ms(now))
        if bucket == view[0]:
            at = 3
        elif bucket == view[0] - 1:
            at = 2
        else:
            return
        view[at] = min(U64_MAX, max(0, view[at] + used - reserved))
        self._write(key, view)

    def charge(self, key: str, tokens: int, now: float) -> None:
        view = self._lookup(key, now_ms(now))
        view[3] = min(U64_MAX, view[3] + tokens)
        self._write(key, view)

    def sync(self, key: str, now: float, prev: int, cur: int, tokens: int = 0) -> RefBudgetDecision:
        view = self._lookup(key, now_ms(now))
        view[2], view[3] = prev, cur
        self._write(key, view)
        return self._decision(view, self._fits(view, tokens), tokens)


# --------------------------------------------------------------------------------------------
# Provider streams (what the upstream sends) and the parser a developer would write
# --------------------------------------------------------------------------------------------


def _dumps(obj: object, ensure_ascii: bool) -> str:
    return json.dumps(obj, ensure_ascii=ensure_ascii, separators=(",", ":"))


def openai_stream(
    deltas: Sequence[str | None],
    finish_reason: str | None = "stop",
    usage: tuple[int, int] | None = None,
    *,
    line_end: str = "\n",
    ensure_ascii: bool = False,
) -> bytes:
    """A chat-completions stream as OpenAI sends it: a role chunk, one chunk per delta (None
    gives `"content": null`), the finish chunk, the usage chunk if `usage` is
    `(prompt_tokens, completion_tokens)` (stream_options.include_usage), then `[DONE]`.
    """
    head: dict[str, object] = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
    }
    head |= {"created": 1741570283, "model": "gpt-4o-2024-08-06", "service_tier": "default"}
    head |= {"system_fingerprint": "fp_eb9dce56a8"}
    extra = {"usage": None} if usage is not None else {}

    def chunk(delta: dict[str, object], reason: str | None) -> dict[str, object]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {**head, "choices": [choice], **extra}

    chunks = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    chunks += [chunk({"content": d}, None) for d in deltas]
    chunks.append(chunk({}, finish_reason))
    if usage is not None:
        prompt, completion = usage
        counts: dict[str, object] = {"prompt_tokens": prompt, "completion_tokens": completion}
        counts |= {"total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": 0}}
        chunks.append({**head, "choices": [], "usage": counts})
    events = [f"data: {_dumps(c, ensure_ascii)}" for c in chunks] + ["data: [DONE]"]
    return "".join(e + line_end * 2 for e in events).encode()


def anthropic_stream(
    deltas: list[str],
    stop_reason: str | None = "end_turn",
    usage: tuple[int, int] = (25, 15),
    *,
    line_end: str = "\n",
    ensure_ascii: bool = False,
    event_field: bool = True,
) -> bytes:
    """A messages stream as Anthropic sends it, `usage` being (input_tokens, output_tokens):
    message_start (output_tokens 1), content_block_start, ping, one text delta per item,
    content_block_stop, message_delta, message_stop. `event_field=False` leaves out the
    `event:` lines, so the parser has to go by each payload's own `type`.
    """
    input_tokens, output_tokens = usage
    message: dict[str, object] = {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
        "type": "message",
        "role": "assistant",
    }
    message |= {"content": [], "model": "claude-sonnet-4-5", "stop_reason": None, "stop_sequence": None}
    message["usage"] = {"input_tokens": input_tokens, "output_tokens": 1}
    events: list[dict[str, object]] = [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]
    events += [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d}}
        for d in deltas
    ]
    events += [
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        },
        {"type": "message_stop"},
    ]
    out = ""
    for event in events:
        if event_field:
            out += f"event: {event['type']}{line_end}"
        out += f"data: {_dumps(event, ensure_ascii)}{line_end}{line_end}"
    return out.encode()


@dataclass(frozen=True)
class UpstreamResult:
    deltas: list[str]
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    error: tuple[str, str] | None
    done: bool


def _obj(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _str_or_none(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _tokens(usage: dict[str, object], key: str, current: int) -> int:
    value = usage.get(key)
    if value is None:
        return current
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected a token count")
    return value


def _error_pair(error: object) -> tuple[str, str]:
    body = _obj(error)

    def text(key: str) -> str | None:
        value = body.get(key)
        return value if isinstance(value, str) and value else None

    return (text("type") or text("code") or "error", text("message") or "")


def parse_upstream(kind: str, data: bytes) -> UpstreamResult:
    """The whole body at once, with json.loads; ValueError where the native parser raises
    UpstreamFormatError. Unlike the native parser it decodes the whole body first, so it
    also refuses invalid UTF-8 after the end marker."""
    events, _ = parse_sse(data)
    deltas: list[str] = []
    finish_reason: str | None = None
    input_tokens = output_tokens = 0
    error: tuple[str, str] | None = None
    done = False
    for event in events:
        if kind == "openai" and event.data == "[DONE]":
            done = True
            break
        payload = _obj(json.loads(event.data))
        if kind == "openai":
            if payload.get("error") is not None:
                error, done = _error_pair(payload["error"]), True
                break
            choices = payload.get("choices")
            if choices is not None:
                if not isinstance(choices, list):
                    raise ValueError("choices is not a list")
                if choices:
                    choice = _obj(choices[0])
                    if choice.get("delta") is not None:
                        content = _str_or_none(_obj(choice["delta"]).get("content"))
                        if content:
                            deltas.append(content)
                    if choice.get("finish_reason") is not None:
                        finish_reason = _str_or_none(choice["finish_reason"])
            if payload.get("usage") is not None:
                usage = _obj(payload["usage"])
                input_tokens = _tokens(usage, "prompt_tokens", input_tokens)
                output_tokens = _tokens(usage, "completion_tokens", output_tokens)
            continue
        own_type = payload.get("type")
        etype = event.type if event.type != "message" else own_type if isinstance(own_type, str) else ""
        if etype == "content_block_delta" and payload.get("delta") is not None:
            delta = _obj(payload["delta"])
            if delta.get("type") == "text_delta":
                text = delta.get("text")
                if not isinstance(text, str):
                    raise ValueError("text delta is not a string")
                if text:
                    deltas.append(text)
        elif etype in ("message_start", "message_delta"):
            if etype == "message_start":
                message = payload.get("message")
                usage_value = None if message is None else _obj(message).get("usage")
            else:
                if payload.get("delta") is not None:
                    reason = _str_or_none(_obj(payload["delta"]).get("stop_reason"))
                    finish_reason = reason if reason is not None else finish_reason
                usage_value = payload.get("usage")
            if usage_value is not None:
                usage = _obj(usage_value)
                input_tokens = _tokens(usage, "input_tokens", input_tokens)
                output_tokens = _tokens(usage, "output_tokens", output_tokens)
        elif etype == "message_stop":
            done = True
            break
        elif etype == "error":
            error = _error_pair(payload["error"]) if payload.get("error") is not None else ("error", "")
            done = True
            break
    return UpstreamResult(deltas, finish_reason, input_tokens, output_tokens, error, done)
