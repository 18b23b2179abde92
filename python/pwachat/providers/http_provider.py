"""The lean, pooled HTTP path to a provider, shared by the OpenAI and Anthropic modules.

The SDKs configure the client (base URL, auth and default headers: pwachat/sdk_config.py); the request itself
goes through one connection pool per provider (`http_client.py`: HTTP/1.1 on asyncio's transports, one
write per request) and the answer is read raw: JSON bodies are decoded by msgspec into the few
fields we use, streams are parsed by the native `UpstreamParser`. The SDKs' own transport and
per-chunk model building cost far more than the relay itself (see benches/).

Retries follow the SDKs' policy (connection errors, 408, 409, 429 and 5xx; `x-should-retry`;
`retry-after` up to 60 s, else exponential backoff with jitter) and happen only before a response
head is accepted, so a stream that has started is never replayed. A request that met a reused
keep-alive connection the server had just closed (`StaleConnection`: nothing of an answer came) is
sent again at once on a fresh one, but counted against `UPSTREAM_MAX_RETRIES` like any retry: the
server may have read the POST before it closed, and a resend can be a second, billed, generation.
The race is rare since the pool honours the server's `Keep-Alive: timeout` (http_client.py).

Through an egress proxy (`proxy.py`), a proxy that refuses the CONNECT tunnel or answers 407 is an
`upstream_error` whose message names the proxy's host and port and its status, never its
credentials; 403 and 407 are not retried (they will not change) and are not worth a fallback, a
502 or 503 is like a refused connection (retried, then `UpstreamUnavailable`).

A provider's `Retry-After` (or `retry-after-ms`) is believed only when it is a finite number of
seconds, or an HTTP date, within 0..`MAX_RETRY_AFTER_S` (contract, "Edge rules"); an unusable one
(`inf`, `nan`, `-5`, `99999999999`, garbage, a date in the year 9999) makes the 429 say
`DEFAULT_RETRY_AFTER_S` instead, and the retry loop back off on its own.

A stream is bounded as a whole, not only between chunks (the relay's `UPSTREAM_TIMEOUT_S` gap):
past `MAX_STREAM_BYTES` of body, or `MAX_STREAM_S` after it was opened, it ends with an
`upstream_error` and its connection is closed. Both are far beyond any real answer (a 32k-token
answer is under 10 MB of events and, at 20 tokens/s, under half an hour); they stop a provider,
or something posing as one, that never stops. Both are checked at each read, with no timer.

Usage is the provider's own wherever it gave it. Where it did not (llama.cpp's server sends no usage
in streams; others send zeros), the server counts it itself, natively and without a tokenizer
(`estimate_input_tokens`, `estimate_output_tokens`: an upper bound from UTF-8 bytes, rust/src/usage.rs),
and says so (`usage_estimated`). Each side is decided alone:
- input: the provider's count when it is not 0 (no real request is 0 tokens), else the estimate of
  what was sent (system prompt, history, message);
- output: the provider's final count when it is not 0, and anything when no text came; else the
  estimate of the text relayed. A stream's final count comes at its end (OpenAI's usage chunk,
  Anthropic's `message_delta`); `message_start`'s `output_tokens` (1, or 0 from llama.cpp) is a
  placeholder written before the answer. So a stream that breaks or is left before its end, once
  text came, has its output estimated (the larger of the estimate and the placeholder), while the
  input that `message_start` reported stays the provider's.
The stream's output is counted by the native parser as it hands out deltas, so it costs nothing per
event; the estimates are made at most once per request, at its end.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import msgspec

from pwachat._native import (
    UpstreamFormatError,
    UpstreamParser,
    estimate_input_tokens,
    estimate_output_tokens,
)
from pwachat.providers.base import (
    ChatInput,
    Completion,
    ProviderError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    normalise_finish_reason,
)
from pwachat.providers.http_client import (
    ConnectFailed,
    Pool,
    ProxyRefused,
    Response,
    StaleConnection,
    TransportError,
)
from pwachat.providers.proxy import Proxy, proxy_for

__all__ = [
    "DEFAULT_RETRY_AFTER_S",
    "MAX_RETRY_AFTER_S",
    "MAX_STREAM_BYTES",
    "MAX_STREAM_S",
    "HttpProvider",
    "RawStream",
    "UpstreamHTTP",
    "error_for_status",
    "retry_after_s",
]

_RETRY_STATUSES = {408, 409, 429}
#: The longest `retry-after` the retry loop waits for; a longer one backs off exponentially (the SDKs').
_MAX_RETRY_WAIT_S = 60.0
#: The longest provider wait passed on to clients (contract, "Edge rules": 0..3600 seconds).
MAX_RETRY_AFTER_S = 3600.0
#: The `Retry-After` (whole seconds) of a 429 whose provider sent one that is unusable.
DEFAULT_RETRY_AFTER_S = 30
#: A stream's whole body, in bytes, past which it ends with `upstream_error` (64 MiB).
MAX_STREAM_BYTES = 64 * 1024 * 1024
#: A stream's whole duration, in seconds from its opening, past which it ends with `upstream_error`.
MAX_STREAM_S = 30 * 60.0


def _seconds(value: str, scale: float = 1.0) -> float | None:
    try:
        seconds = float(value) / scale
    except ValueError:
        return None
    # NaN fails both comparisons; inf and 1e999 (inf too) fail the second.
    return seconds if 0.0 <= seconds <= MAX_RETRY_AFTER_S else None


def _date_wait(value: str) -> float | None:
    try:
        wait = parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    # A date up to an hour past is a wait already over (the clocks disagree); further is nonsense.
    return max(wait, 0.0) if -MAX_RETRY_AFTER_S <= wait <= MAX_RETRY_AFTER_S else None


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds the provider asked us to wait (`retry-after-ms`, else `retry-after` in seconds or as
    an HTTP date); None when it said nothing usable: absent, not a finite number, outside
    0..MAX_RETRY_AFTER_S, or not a date."""
    ms = headers.get("retry-after-ms")
    if ms:
        wait = _seconds(ms, 1000.0)
        if wait is not None:
            return wait
    value = headers.get("retry-after")
    if not value:
        return None
    wait = _seconds(value)
    return wait if wait is not None else _date_wait(value)


def error_for_status(label: str, status: int, headers: Mapping[str, str]) -> ProviderError:
    """The contract's error for a provider's final non-2xx answer; never its body or our key."""
    if status == 429:
        wait = retry_after_s(headers)
        if wait is not None:
            retry_after: int | None = max(1, math.ceil(wait))
        elif "retry-after" in headers or "retry-after-ms" in headers:
            retry_after = DEFAULT_RETRY_AFTER_S  # it said something, but nothing a client can use
        else:
            retry_after = None
        return UpstreamRateLimited(
            f"{label} is rate limiting requests; try again later", retry_after=retry_after
        )
    if status in (401, 403):
        return UpstreamError(f"{label} refused the server's credentials (HTTP {status})")
    if status in (408, 504):
        return UpstreamTimeout(f"{label} timed out (HTTP {status})")
    if status < 500:
        return UpstreamError(f"{label} refused the request (HTTP {status})")
    return UpstreamUnavailable(f"{label} failed (HTTP {status})")


class UpstreamHTTP:
    """One connection pool for one provider; made at start-up, closed at shutdown."""

    def __init__(
        self,
        *,
        label: str,
        base_url: str,
        headers: dict[str, str],
        max_retries: int,
        map_status: Callable[[int, Mapping[str, str]], ProviderError],
        proxy: Proxy | None = None,
    ) -> None:
        self.label = label
        self.max_retries = max_retries
        self.map_status = map_status
        # Whole-request bounds are the relay's (UPSTREAM_TIMEOUT_S); only connecting is bounded here.
        self.pool = Pool(base_url, {"Content-Type": "application/json", **headers}, proxy=proxy)

    async def post(self, path: str, body: bytes) -> Response:
        """POST and return the accepted (2xx) response with its body unread; map every failure."""
        request = self.pool.request_bytes(path, body)
        attempt = 0
        while True:
            try:
                resp = await self.pool.send(request)
            except StaleConnection:
                # A reused connection the server closed as we wrote: the request may have reached
                # it, so a resend is a retry like any other, counted; sent at once (the server is
                # not failing, our connection was old).
                if attempt < self.max_retries:
                    attempt += 1
                    continue
                raise UpstreamUnavailable(f"Could not reach {self.label}") from None
            except ProxyRefused as err:
                # The proxy's own words (its host and port and status), never its credentials.
                if err.status in (403, 407):  # our configuration: no retry or fallback will help
                    raise UpstreamError(f"Could not reach {self.label}: {err}") from None
                if attempt >= self.max_retries:  # 502, 503...: the proxy could not reach it
                    raise UpstreamUnavailable(f"Could not reach {self.label}: {err}") from None
                await asyncio.sleep(_backoff(attempt, None))
                attempt += 1
                continue
            except (ConnectFailed, TransportError, OSError):
                if attempt < self.max_retries:
                    await asyncio.sleep(_backoff(attempt, None))
                    attempt += 1
                    continue
                raise UpstreamUnavailable(f"Could not reach {self.label}") from None
            if resp.status < 300:
                return resp
            resp.release()
            if resp.status == 407 and self.pool.proxy is not None:
                raise UpstreamError(
                    f"Could not reach {self.label}: the proxy {self.pool.proxy.where} "
                    "asked for credentials (HTTP 407)"
                )
            if attempt < self.max_retries and _should_retry(resp):
                await asyncio.sleep(_backoff(attempt, retry_after_s(resp.headers)))
                attempt += 1
                continue
            raise self.map_status(resp.status, resp.headers)

    async def aclose(self) -> None:
        await self.pool.aclose()


def _should_retry(resp: Response) -> bool:
    explicit = resp.headers.get("x-should-retry")
    if explicit == "true":
        return True
    if explicit == "false":
        return False
    return resp.status in _RETRY_STATUSES or resp.status >= 500


def _backoff(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None and 0 < retry_after <= _MAX_RETRY_WAIT_S:
        return retry_after
    return min(0.5 * 2**attempt, 8.0) * (1 - 0.25 * random.random())  # jitter, not crypto


#: `estimate_output_tokens` of an answer with no text: a parser's estimate above it means text came.
_EMPTY_ANSWER = estimate_output_tokens("")


class RawStream:
    """An accepted streamed response, parsed natively as its bytes arrive (see base.ProviderStream).

    `next()` waits for the next network read and returns its text deltas; `ready()` returns what
    has already arrived without waiting. Waiting is cancellation-safe: the connection keeps bytes
    that arrive while nobody reads (`http_client.py`), so the relay can wait with a deadline (heartbeats)
    and read on. Each read counts against `MAX_STREAM_BYTES` and `MAX_STREAM_S` (module docstring).
    """

    def __init__(
        self,
        resp: Response,
        kind: str,
        label: str,
        map_event_error: Callable[[str, str], ProviderError],
        chat: ChatInput,
    ) -> None:
        self._resp = resp
        self._parser = UpstreamParser(kind)
        self._label = label
        self._map_event_error = map_event_error
        self._chat = chat  # what was sent: the input estimate when the provider counts none
        self._input_estimate = 0  # made once, when first needed
        self._error: ProviderError | None = None  # raised by the next next(), after the deltas before it
        self._bytes_left = MAX_STREAM_BYTES
        self._deadline = time.monotonic() + MAX_STREAM_S
        self.finished = False
        self.finish_reason = "stop"

    @property
    def failed(self) -> bool:
        return self._error is not None

    # The counts are read at the end (done, or a failure, or the reader gone), a few times in all:
    # worked out from the parser's each time rather than kept in step with every read.
    @property
    def input_tokens(self) -> int:
        reported = self._parser.input_tokens
        if reported > 0:
            return reported
        if not self._input_estimate:
            chat = self._chat
            self._input_estimate = estimate_input_tokens(chat.system, chat.history, chat.message)
        return self._input_estimate

    @property
    def output_tokens(self) -> int:
        parser = self._parser
        if self._output_counted():
            return parser.output_tokens
        return max(parser.output_tokens, parser.estimated_output_tokens)

    @property
    def usage_estimated(self) -> bool:
        return self._parser.input_tokens <= 0 or not self._output_counted()

    def _output_counted(self) -> bool:
        """The provider's output count stands: it is its final one and not 0, or no text came."""
        parser = self._parser
        if parser.output_final and parser.output_tokens > 0:
            return True
        return parser.estimated_output_tokens <= _EMPTY_ANSWER

    def _consume(self, data: bytes) -> list[str]:
        self._bytes_left -= len(data)
        if self._bytes_left < 0 or time.monotonic() > self._deadline:
            # What came past a bound is refused, and the provider stops generating now.
            what = "sent more" if self._bytes_left < 0 else "took longer"
            self._error = UpstreamError(f"{self._label} {what} than the server accepts for one answer")
            self._resp.close()
            return []
        parser = self._parser
        try:
            deltas = parser.feed(data)
        except UpstreamFormatError:
            deltas = []
            self._error = UpstreamError(f"{self._label} sent a malformed stream")
            return deltas
        if parser.failed:  # deltas before the malformed event still go out first
            self._error = UpstreamError(f"{self._label} sent a malformed stream")
        elif parser.done:
            if parser.error is not None:
                self._error = self._map_event_error(*parser.error)
            else:
                self.finished = True
                self.finish_reason = normalise_finish_reason(parser.finish_reason)
        return deltas

    def ready(self) -> list[str]:
        if self.finished or self._error is not None:
            return []
        data = self._resp.read_nowait()
        return self._consume(data) if data else []

    async def next(self) -> list[str]:
        while True:
            if self._error is not None:
                raise self._error
            if self.finished:
                return []
            try:
                data = await self._resp.readany()  # what came before a break comes first
            except TimeoutError:
                raise  # interrupted: the reader's deadline (see `interrupt`)
            except (TransportError, OSError):
                self._error = UpstreamError(f"The connection to {self._label} broke mid-stream")
                continue
            deltas = self._consume(data) if data else []
            if not data and not self.finished and self._error is None:
                self._error = UpstreamError(f"The connection to {self._label} ended mid-stream")
            if deltas or self.finished:
                return deltas

    def interrupt(self) -> None:
        """Make a pending (or the next) `next()` raise TimeoutError unless something arrives first:
        how the relay's one timer per stream ends a wait (heartbeat, gap timeout)."""
        self._resp.interrupt()

    def abort(self) -> None:
        """Close the connection now (the client left): the provider stops generating, and billing."""
        self._resp.close()

    async def aclose(self) -> None:
        # A finished stream goes back to the pool; anything else closes the connection.
        if self.finished:
            self._resp.release()
        else:
            self._resp.close()


class HttpProvider:
    """What the OpenAI and Anthropic providers share: one pooled session, the request, the raw
    read. A subclass names its wire format (`kind`, `path`) and writes `_body` and `_completion`,
    plus the error mapping of its own statuses and in-stream error events."""

    name: str
    label: str
    kind: str  # the native parser's name for the stream format
    path: str  # appended to the base URL

    def __init__(
        self, models: tuple[str, ...], settings: Any, base_url: str, headers: dict[str, str]
    ) -> None:
        # base_url and headers are the SDK client's own (pwachat/sdk_config.py).
        self.models = models
        self.http = UpstreamHTTP(
            label=self.label,
            base_url=base_url,
            headers=headers,
            max_retries=settings.upstream_max_retries,
            map_status=self._map_status,
            proxy=proxy_for(
                base_url,
                https_proxy=settings.https_proxy,
                http_proxy=settings.http_proxy,
                no_proxy=settings.no_proxy,
            ),
        )

    def _body(self, chat: ChatInput, stream: bool) -> bytes:
        raise NotImplementedError

    def _completion(self, raw: bytes) -> Completion:
        """Decode a whole answer; raise `msgspec.DecodeError`, `IndexError` or `KeyError` when unusable."""
        raise NotImplementedError

    def _map_status(self, status: int, headers: Mapping[str, str]) -> ProviderError:
        return error_for_status(self.label, status, headers)

    def _map_event_error(self, kind: str, message: str) -> ProviderError:
        raise NotImplementedError

    async def complete(self, chat: ChatInput) -> Completion:
        resp = await self.http.post(self.path, self._body(chat, stream=False))
        try:
            # Cut short (a break, the route's timeout, a cancel), the read closes the connection
            # itself: the provider stops generating an answer nobody will read.
            raw = await resp.read()
        except (TransportError, OSError):
            raise UpstreamUnavailable(
                f"The connection to {self.label} broke while reading its answer"
            ) from None
        resp.release()
        try:
            done = self._completion(raw)
        except (msgspec.DecodeError, IndexError, KeyError):
            raise UpstreamError(f"{self.label} answered something unusable") from None
        return _counted(done, chat)

    async def open_stream(self, chat: ChatInput) -> RawStream:
        resp = await self.http.post(self.path, self._body(chat, stream=True))
        return RawStream(resp, self.kind, self.label, self._map_event_error, chat)

    async def aclose(self) -> None:
        await self.http.aclose()


def _counted(done: Completion, chat: ChatInput) -> Completion:
    """A whole answer with the server's own counts where the provider's are missing (module docstring)."""
    missing_input = done.input_tokens <= 0
    missing_output = done.output_tokens <= 0 and done.text != ""
    if not (missing_input or missing_output):
        return done  # the provider's own, as it is
    return msgspec.structs.replace(
        done,
        input_tokens=estimate_input_tokens(chat.system, chat.history, chat.message)
        if missing_input
        else done.input_tokens,
        output_tokens=estimate_output_tokens(done.text) if missing_output else done.output_tokens,
        usage_estimated=True,
    )
