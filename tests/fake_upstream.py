"""A fake OpenAI + Anthropic upstream on 127.0.0.1, speaking both wire formats as the official SDKs read them.

Routes (one server, both providers):

- OpenAI: ``POST /v1/chat/completions`` (canonical; give the SDK ``base_url = url + "/v1"``), also accepted
  without the prefix as ``POST /chat/completions`` for a base URL without ``/v1``. ``GET /v1/models`` (and
  ``/models``) lists models. Auth: ``Authorization: Bearer <key>``.
- Anthropic: ``POST /v1/messages`` (give the SDK ``base_url = url``, it adds ``/v1`` itself).
  ``GET /v1/models`` with an ``x-api-key`` or ``anthropic-version`` header answers in Anthropic's format.
  Auth: ``x-api-key: <key>`` (or ``Authorization: Bearer <key>``, which anthropic>=2 sends) plus an
  ``anthropic-version`` header.
- Control, so that it works from another process: ``POST /_control/behaviour``, ``POST /_control/reset``,
  ``GET /_control/requests[?provider=...]``, ``GET /_control/stats``.

The answer is ``"Echo from <provider>: <last user message>"`` in word-sized deltas unless set. Failures are
injected per provider with :meth:`FakeUpstream.behave` (or the control route); see :data:`PARAMS`.

Usage is counted as words: ``input_tokens`` the words of the system prompt and messages (at least 1),
``output_tokens`` the deltas (``input_tokens``/``output_tokens`` override them). ``omit_usage`` answers as
servers that do not count do:

- OpenAI: no ``usage`` in the body (the SDK reads ``usage=None``: the field is optional) and, streamed, no
  usage chunk (nor ``"usage": null`` on the chunks) whatever ``stream_options.include_usage`` says: the
  finish chunk, then ``[DONE]``, as the llama.cpp server tried in issue 12 streamed;
- Anthropic: the usage fields are there (the SDK requires them) but 0: ``message_start`` with
  ``input_tokens: 0, output_tokens: 0`` and ``message_delta`` with ``output_tokens: 0``, the body's
  ``usage`` likewise. llama.cpp's ``/v1/messages`` writes ``output_tokens: 0`` in ``message_start``, and
  ``input_tokens`` there leaves out cached prompt tokens, 0 for a prompt it had cached whole.

Run as its own process (the load bench runs it on another core)::

    python tests/fake_upstream.py --host 127.0.0.1 --port 0   # prints "LISTENING http://127.0.0.1:PORT"

Opt-in, for a provider over TLS: ``--tls-cert CERT --tls-key KEY`` (PEM files, e.g. from a ``trustme``
throwaway CA) serves the same app on a second, TLS port as well (``--tls-port``, 0 picks one), printed on a
second line ``LISTENING_TLS https://127.0.0.1:PORT``; control calls work on either port.

Each request (control calls aside) leaves a record: ``seq``, ``provider``, ``method``, ``path``, ``query``,
``headers`` (lower-cased names), ``body`` (parsed JSON, or None and ``body_text``), ``stream``, ``behaviour``
(the non-default parameters used, None if refused before), ``status``, ``received_at``, ``head_sent_at``,
``finished_at``, ``deltas_sent``, ``completed`` (the response was written to its end), ``client_gone`` and
``gone_at`` (the client left before that), ``dropped`` (the fake cut the connection). Times are
``time.monotonic()`` values; on Linux that clock is shared by all processes of the host, so a test in another
process can compare them with its own. ``/_control/stats`` has ``open_connections`` (TCP connections open
to the fake, control connections excluded), ``in_flight``, ``totals`` and ``queued``.

A client going away is noticed at once: the server runs with aiohttp's ``handler_cancellation``, so the
handler is cancelled as soon as the connection is lost, even while it waits (head delay, pacing); a write
to a closing transport counts too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import re
import resource
import signal
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from aiohttp import web

PROVIDERS = ("openai", "anthropic")
DEFAULT_OPENAI_KEY = "sk-test-openai"
DEFAULT_ANTHROPIC_KEY = "sk-ant-test"
OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini")
ANTHROPIC_MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1")
_CREATED = 1_735_689_600  # a fixed `created` for models, so answers are deterministic

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _enc(obj: Any) -> bytes:
    return _dumps(obj).encode()


# ----------------------------------------------------------------------------------------------------
# Behaviour


@dataclass(frozen=True)
class Behaviour:
    """What the fake does with one completion request. Every field is a control-API parameter."""

    status: int | None = None  # answer this HTTP status (>= 400) with the provider's error body
    # `retry-after` header on an injected error status: a number of seconds, or a string sent verbatim (an
    # HTTP date, or the nonsense some servers send: "inf", "-5", "soon")
    retry_after: float | str | None = None
    retry_after_ms: int | str | None = None  # `retry-after-ms` (a string verbatim); both SDKs honour it
    error_type: str | None = None  # override the provider error `type` (status body and in-stream error)
    error_message: str | None = None  # override the provider error `message`
    head_delay_s: float = 0.0  # wait before sending the response head (also before an error status)
    deltas: tuple[str, ...] | None = None  # the answer's text deltas (default: derived from the request)
    chunks: int | None = None  # number of deltas to send (cycles through the deltas)
    chunk_interval_s: float = 0.0  # wait before each delta (non-streamed: total wait = deltas * interval)
    drop_after: int | None = None  # transport.abort() after N deltas (non-streamed: no response at all)
    error_event_after: int | None = None  # in-stream provider error after N deltas, then end the stream
    malformed: bool = False  # non-streamed: a 200 body that is not JSON; streamed: one event that is not JSON
    malformed_after: int = 0  # streamed: the bad event replaces delta N (0: the first)
    body_pause_s: float = 0.0  # non-streamed: head + half the body (chunked) at once, the rest this later
    finish_reason: str | None = None  # OpenAI finish_reason / Anthropic stop_reason override
    input_tokens: int | None = None  # usage override (OpenAI prompt_tokens)
    output_tokens: int | None = None  # usage override (OpenAI completion_tokens)
    omit_usage: bool = False  # report no usage, as servers that do not count (module docstring)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "status": (int,),
    "retry_after": (int, float, str),
    "retry_after_ms": (int, str),
    "error_type": (str,),
    "error_message": (str,),
    "head_delay_s": (int, float),
    "deltas": (list, tuple),
    "chunks": (int,),
    "chunk_interval_s": (int, float),
    "drop_after": (int,),
    "error_event_after": (int,),
    "malformed": (bool,),
    "malformed_after": (int,),
    "body_pause_s": (int, float),
    "finish_reason": (str,),
    "input_tokens": (int,),
    "output_tokens": (int,),
    "omit_usage": (bool,),
}
PARAMS = tuple(f.name for f in fields(Behaviour))
_NULLABLE = {f.name for f in fields(Behaviour) if f.default is None}
assert set(_FIELD_TYPES) == set(PARAMS)


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """Check control parameters; returns them normalised. Raises ValueError naming the bad one."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name not in _FIELD_TYPES:
            raise ValueError(f"unknown behaviour parameter {name!r} (known: {', '.join(PARAMS)})")
        if value is None:
            if name not in _NULLABLE:
                raise ValueError(f"{name} cannot be null")
            out[name] = None
            continue
        types = _FIELD_TYPES[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{name} must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"{name} must not be negative")
        if isinstance(value, str) and name.startswith("retry_after") and any(c in value for c in "\r\n\0"):
            raise ValueError(f"{name} must fit on one header line")
        if name == "status" and not 400 <= value <= 599:
            raise ValueError("status must be an HTTP error status (400..599)")
        if name == "deltas":
            if not all(isinstance(d, str) for d in value):
                raise ValueError("deltas must be a list of strings")
            value = tuple(value)
        out[name] = value
    if out.get("chunks") and out.get("deltas") == ():
        raise ValueError("chunks needs at least one delta to cycle through")
    return out


def _provider_name(value: Any) -> str:
    if value == "claude":
        return "anthropic"
    if value not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# Provider error bodies

_OPENAI_ERRORS = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Country not supported."),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model does not exist or you do not have access to it.",
    ),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_ANTHROPIC_ERRORS = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    503: ("overloaded_error", "Overloaded"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}


def openai_error(status: int, message: str | None = None, etype: str | None = None, code: Any = ...) -> dict:
    default = _OPENAI_ERRORS.get(status) or _OPENAI_ERRORS[500 if status >= 500 else 400]
    return {
        "error": {
            "message": message or default[2],
            "type": etype or default[0],
            "param": None,
            "code": default[1] if code is ... else code,
        }
    }


def anthropic_error(
    status: int, message: str | None = None, etype: str | None = None, request_id: str = ""
) -> dict:
    default = _ANTHROPIC_ERRORS.get(status) or _ANTHROPIC_ERRORS[500 if status >= 500 else 400]
    body: dict[str, Any] = {
        "type": "error",
        "error": {"type": etype or default[0], "message": message or default[1]},
    }
    if request_id:
        body["request_id"] = request_id
    return body


class _Reject(Exception):
    """A request the real service would refuse (auth, validation): answered with the provider's error body."""

    def __init__(self, status: int, body: dict) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


# ----------------------------------------------------------------------------------------------------
# Request reading helpers

_WORD = re.compile(r"\s*\S+")


def split_words(text: str) -> list[str]:
    """Word-sized deltas whose concatenation is exactly `text` (leading spaces stay with their word)."""
    parts = _WORD.findall(text)
    tail = text[len("".join(parts)) :]
    if tail:
        if parts:
            parts[-1] += tail
        else:
            parts = [tail]
    return parts


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _count_words(body: dict) -> int:
    n = 0
    system = body.get("system")
    if system is not None:
        n += len(_text_of(system).split())
    for m in body.get("messages") or ():
        if isinstance(m, dict):
            n += len(_text_of(m.get("content")).split())
    return max(n, 1)


def _last_user_text(body: dict) -> str:
    for m in reversed(body.get("messages") or ()):
        if isinstance(m, dict) and m.get("role") == "user":
            return _text_of(m.get("content"))
    return ""


_OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")


def _validate_openai(body: Any) -> None:
    def bad(msg: str) -> _Reject:
        return _Reject(400, openai_error(400, msg))

    if not isinstance(body, dict):
        raise bad("We could not parse the JSON body of your request.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad("you must provide a model parameter")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("Missing required parameter: 'messages'.")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _OPENAI_ROLES:
            raise bad(f"Invalid value for 'messages[{i}].role'.")
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise bad("The 'stream_options' parameter is only allowed when 'stream' is enabled.")


def _validate_anthropic(body: Any) -> None:
    def bad(msg: str) -> _Reject:
        return _Reject(400, anthropic_error(400, msg))

    if not isinstance(body, dict):
        raise bad("There was an error parsing the body of your request.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad("model: Field required")
    if not isinstance(body.get("max_tokens"), int) or isinstance(body["max_tokens"], bool):
        raise bad("max_tokens: Field required")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages: Field required")
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            # the real API refuses a system message inside `messages`: it belongs in the top-level `system`
            raise bad(f'messages.{i}.role: Input should be "user" or "assistant", got {role!r}')


# ----------------------------------------------------------------------------------------------------
# The server


@dataclass
class _Answer:
    deltas: list[str]
    finish: str
    input_tokens: int
    output_tokens: int
    model: str
    msg_id: str
    stream: bool
    include_usage: bool
    omit_usage: bool


class FakeServer:
    """The aiohttp application and its state; everything here runs on the server's event loop."""

    def __init__(
        self,
        openai_key: str = DEFAULT_OPENAI_KEY,
        anthropic_key: str = DEFAULT_ANTHROPIC_KEY,
        max_records: int = 10_000,
        keyless_openai: bool = False,
    ) -> None:
        self.keys = {"openai": openai_key, "anthropic": anthropic_key}
        # As llama.cpp's server without --api-key: no Authorization is accepted (a wrong key is not).
        self.keyless_openai = keyless_openai
        self.standing: dict[str, dict[str, Any]] = {p: {} for p in PROVIDERS}
        self.queued: dict[str, deque[list[Any]]] = {p: deque() for p in PROVIDERS}
        self.records: deque[dict[str, Any]] = deque(maxlen=max_records)
        self.totals: Counter[str] = Counter()
        self.seq = 0
        self.in_flight = 0
        self.stopping = False
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._tickers: dict[tuple, _Ticker] = {}  # shared pacing timers, see _Ticker
        self._control_conns: set[Any] = set()  # connections that served /_control (not counted as upstream)
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        r = self.app.router
        r.add_post("/v1/chat/completions", self._openai_chat)
        r.add_post("/chat/completions", self._openai_chat)
        r.add_get("/v1/models", self._models)
        r.add_get("/models", self._models)
        r.add_post("/v1/messages", self._anthropic_messages)
        r.add_post("/_control/behaviour", self._ctl_behaviour)
        r.add_post("/_control/reset", self._ctl_reset)
        r.add_get("/_control/requests", self._ctl_requests)
        r.add_get("/_control/stats", self._ctl_stats)
        r.add_route("*", "/{tail:.*}", self._unknown)

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        if not ipaddress.ip_address("127.0.0.1" if host == "localhost" else host).is_loopback:
            raise ValueError(f"the fake upstream only listens on loopback, not {host}")
        # handler_cancellation: when a client goes away, aiohttp cancels the handler at once (it does not by
        # default since 3.7), so a disconnect is noticed even while the handler sleeps between deltas.
        self.runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, backlog=4096, reuse_address=True)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def add_tls_site(self, context: ssl.SSLContext, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve the same app over TLS on a second port (after start()); returns that port."""
        if self.runner is None:
            raise RuntimeError("start() first")
        site = web.TCPSite(self.runner, host, port, backlog=4096, reuse_address=True, ssl_context=context)
        await site.start()
        return self.runner.addresses[-1][1]  # the sites' sockets, in the order they started

    async def stop(self) -> None:
        self.stopping = True
        if self.runner is not None:
            await self.runner.cleanup()

    # -- state -------------------------------------------------------------------------------------------

    def set_behaviour(self, provider: str, params: dict[str, Any], count: int | None) -> dict[str, Any]:
        provider = _provider_name(provider)
        params = validate_params(params)
        if count is None:
            self.standing[provider] = params
        else:
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError("count must be a positive integer or null")
            self.queued[provider].append([params, count])
        return {"provider": provider, "count": count, **params}

    def reset(self) -> None:
        for p in PROVIDERS:
            self.standing[p] = {}
            self.queued[p].clear()
        self.records.clear()
        self.totals.clear()

    def _pick(self, provider: str) -> Behaviour:
        params = self.standing[provider]
        queue = self.queued[provider]
        if queue:
            head = queue[0]
            params = {**params, **head[0]}
            head[1] -= 1
            if head[1] <= 0:
                queue.popleft()
        return Behaviour(**params)

    def open_connections(self) -> int:
        server = self.runner.server if self.runner is not None else None
        if server is None:
            return 0
        conns = server.connections
        self._control_conns.intersection_update(conns)
        return sum(1 for c in conns if c not in self._control_conns)

    def stats(self) -> dict[str, Any]:
        return {
            "open_connections": self.open_connections(),
            "in_flight": self.in_flight,
            "totals": dict(self.totals),
            "queued": {p: sum(n for _, n in self.queued[p]) for p in PROVIDERS},
        }

    # -- records -----------------------------------------------------------------------------------------

    def _record(self, request: web.Request, provider: str) -> dict[str, Any]:
        self.seq += 1
        self.in_flight += 1
        self.totals["requests"] += 1
        self.totals[provider] += 1
        rec: dict[str, Any] = {
            "seq": self.seq,
            "provider": provider,
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": None,
            "stream": False,
            "behaviour": None,
            "status": None,
            "received_at": time.monotonic(),
            "head_sent_at": None,
            "finished_at": None,
            "deltas_sent": 0,
            "completed": False,
            "client_gone": False,
            "gone_at": None,
            "dropped": False,
        }
        self.records.append(rec)
        return rec

    def _finish(self, rec: dict[str, Any], *, completed: bool = False, gone: bool = False) -> None:
        if rec["finished_at"] is not None:
            return
        now = time.monotonic()
        rec["finished_at"] = now
        self.in_flight -= 1
        self.totals["deltas_sent"] += rec["deltas_sent"]
        if completed:
            rec["completed"] = True
            self.totals["completed"] += 1
        if gone:
            rec["client_gone"] = True
            rec["gone_at"] = now
            self.totals["client_gone"] += 1
        if rec["dropped"]:
            self.totals["dropped"] += 1

    async def _guarded(self, request: web.Request, provider: str, handler: Callable) -> web.StreamResponse:
        rec = self._record(request, provider)
        resp: web.StreamResponse | None = None
        try:
            resp = await handler(request, rec)
            self._finish(rec)  # no-op when the handler recorded the outcome itself
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the connection is lost (handler_cancellation=True)
            self._finish(rec, gone=not self.stopping)
            raise
        except ConnectionResetError:  # a write to a connection the client closed (aiohttp's subclass too)
            self._finish(rec, gone=True)
            resp = web.Response(status=499)
        except _Reject as rej:
            resp = await self._send_json(request, rec, rej.status, rej.body, {})
        except Exception:
            self._finish(rec)
            raise
        return resp

    # -- responses ---------------------------------------------------------------------------------------

    async def _send_json(
        self, request: web.Request, rec: dict, status: int, body: Any, headers: dict[str, str]
    ) -> web.StreamResponse:
        raw = body if isinstance(body, bytes) else _enc(body)
        resp = web.Response(status=status, body=raw, content_type="application/json", headers=headers)
        rec["status"] = status
        await resp.prepare(request)
        rec["head_sent_at"] = time.monotonic()
        await resp.write_eof()
        self._finish(rec, completed=True)
        return resp

    def _ids(self, provider: str, rec: dict) -> tuple[str, dict[str, str]]:
        n = rec["seq"]
        if provider == "openai":
            return f"chatcmpl-fake{n:08d}", {"x-request-id": f"req_fake{n:08d}", "openai-processing-ms": "1"}
        return f"msg_fake{n:08d}", {"request-id": f"req_fake{n:08d}"}

    def _check_auth(self, request: web.Request, provider: str) -> None:
        h = request.headers
        if provider == "openai":
            auth = h.get("authorization", "")
            if not auth and self.keyless_openai:
                return
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or key.strip() != self.keys["openai"]:
                msg = (
                    "You didn't provide an API key. You need to provide your API key in an Authorization "
                    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                    if not auth
                    else "Incorrect API key provided. You can find your API key at "
                    "https://platform.openai.com/account/api-keys."
                )
                raise _Reject(401, openai_error(401, msg, code="invalid_api_key"))
        else:
            # The real API takes `x-api-key`; anthropic>=2 sends the key as `Authorization: Bearer` instead.
            scheme, _, bearer = h.get("authorization", "").partition(" ")
            key = h.get("x-api-key") or (bearer.strip() if scheme.lower() == "bearer" else None)
            if key != self.keys["anthropic"]:
                raise _Reject(401, anthropic_error(401, "invalid x-api-key"))
            if not h.get("anthropic-version"):
                raise _Reject(400, anthropic_error(400, "anthropic-version: header is required"))

    async def _read_json(self, request: web.Request, rec: dict, provider: str) -> Any:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            rec["body_text"] = raw.decode("utf-8", "replace")
            err = (
                openai_error(400, "We could not parse the JSON body of your request.")
                if provider == "openai"
                else anthropic_error(400, "There was an error parsing the body of your request.")
            )
            raise _Reject(400, err) from None
        rec["body"] = body
        return body

    def _answer(self, provider: str, body: dict, b: Behaviour, msg_id: str) -> _Answer:
        if b.deltas is not None:
            base = list(b.deltas)
        else:
            base = split_words(f"Echo from {provider}: {_last_user_text(body)}")
        deltas = base if b.chunks is None else [base[i % len(base)] for i in range(b.chunks)]
        if provider == "openai":
            limit = body.get("max_completion_tokens", body.get("max_tokens"))
            finish, truncated = "stop", "length"
        else:
            limit = body.get("max_tokens")
            finish, truncated = "end_turn", "max_tokens"
        if isinstance(limit, int) and not isinstance(limit, bool) and len(deltas) >= limit:
            deltas, finish = deltas[:limit], truncated
        opts = body.get("stream_options")
        return _Answer(
            deltas=deltas,
            finish=b.finish_reason or finish,
            input_tokens=_count_words(body) if b.input_tokens is None else b.input_tokens,
            output_tokens=len(deltas) if b.output_tokens is None else b.output_tokens,
            model=body["model"],
            msg_id=msg_id,
            stream=body.get("stream") is True,
            include_usage=isinstance(opts, dict) and opts.get("include_usage") is True and not b.omit_usage,
            omit_usage=b.omit_usage,
        )

    async def _completion(self, request: web.Request, rec: dict, provider: str) -> web.StreamResponse:
        self._check_auth(request, provider)
        body = await self._read_json(request, rec, provider)
        (_validate_openai if provider == "openai" else _validate_anthropic)(body)
        b = self._pick(provider)
        rec["behaviour"] = {k: v for k, v in asdict(b).items() if v != getattr(Behaviour, k)}
        msg_id, headers = self._ids(provider, rec)
        rec["stream"] = body.get("stream") is True
        if b.head_delay_s:
            await asyncio.sleep(b.head_delay_s)
        if b.status is not None:
            if isinstance(b.retry_after, str):
                headers["retry-after"] = b.retry_after
            elif b.retry_after is not None:
                ra = b.retry_after
                headers["retry-after"] = str(int(ra)) if float(ra).is_integer() else str(ra)
            if b.retry_after_ms is not None:
                headers["retry-after-ms"] = str(b.retry_after_ms)
            err = (
                openai_error(b.status, b.error_message, b.error_type)
                if provider == "openai"
                else anthropic_error(b.status, b.error_message, b.error_type, headers["request-id"])
            )
            return await self._send_json(request, rec, b.status, err, headers)
        ans = self._answer(provider, body, b, msg_id)
        if ans.stream:
            return await self._stream(request, rec, provider, b, ans, headers)
        if b.chunk_interval_s and ans.deltas:
            await asyncio.sleep(b.chunk_interval_s * len(ans.deltas))
        if b.drop_after is not None:
            return self._drop(request, rec)
        if b.malformed:
            return await self._send_json(
                request, rec, 200, b'{"id": "' + msg_id.encode() + b'", "object": ', headers
            )
        rec["deltas_sent"] = len(ans.deltas)
        full = _openai_message(ans) if provider == "openai" else _anthropic_message(ans)
        if b.body_pause_s:
            return await self._send_paused(request, rec, _enc(full), headers, b.body_pause_s)
        return await self._send_json(request, rec, 200, full, headers)

    async def _send_paused(
        self, request: web.Request, rec: dict, raw: bytes, headers: dict[str, str], pause_s: float
    ) -> web.StreamResponse:
        """A whole JSON answer, chunked, that stalls half-way: a client that gives up on it has to hang up."""
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "application/json"
        resp.enable_chunked_encoding()
        rec["status"] = 200
        await resp.prepare(request)
        rec["head_sent_at"] = time.monotonic()
        half = len(raw) // 2
        await resp.write(raw[:half])
        await asyncio.sleep(pause_s)
        await resp.write(raw[half:])
        await resp.write_eof()
        self._finish(rec, completed=True)
        return resp

    def _drop(self, request: web.Request, rec: dict) -> web.StreamResponse:
        rec["dropped"] = True
        transport = request.transport
        if transport is not None:
            transport.abort()
        self._finish(rec)
        return web.Response(status=499)  # never sent: the transport is gone, aiohttp drops it quietly

    async def _stream(
        self, request: web.Request, rec: dict, provider: str, b: Behaviour, ans: _Answer, headers: dict
    ) -> web.StreamResponse:
        if provider == "openai":
            head, deltas, tail, error_ev = _openai_events(ans, b)
        else:
            head, deltas, tail, error_ev = _anthropic_events(ans, b)
        n = len(deltas)
        drop_at = None if b.drop_after is None else min(b.drop_after, n)
        error_at = None if b.error_event_after is None else min(b.error_event_after, n)
        bad_at = min(b.malformed_after, n) if b.malformed else None
        if bad_at is not None:
            bad = (
                b"data: {not json\n\n"
                if provider == "openai"
                else b"event: content_block_delta\ndata: {not json\n\n"
            )
            deltas = [*deltas[:bad_at], bad, *deltas[bad_at + 1 :]]

        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "text/event-stream"
        resp.charset = "utf-8"
        resp.headers["cache-control"] = "no-cache"
        chunked = request.version >= (1, 1)
        if chunked:
            resp.enable_chunked_encoding()
        rec["status"] = 200
        await resp.prepare(request)
        rec["head_sent_at"] = time.monotonic()
        await resp.write(head)
        # The deltas bypass aiohttp's writer: each is framed once up front (HTTP/1.1 chunk) and goes to the
        # transport in one write. aiohttp only writes the head and, through write_eof, the tail.
        stop_at = min(x for x in (drop_at, error_at, n) if x is not None)
        frames = [b"%x\r\n%b\r\n" % (len(d), d) for d in deltas[:stop_at]] if chunked else deltas[:stop_at]
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client gone")
        if b.chunk_interval_s and frames:
            pacer = _Pacer(transport, frames, rec)
            _Ticker.pace(self._tickers, pacer, b.chunk_interval_s)
            await pacer.done  # a cancellation (client gone) cancels `done` too, which retires the pacer
        else:
            for i, frame in enumerate(frames):
                if transport.is_closing():
                    raise ConnectionResetError("client gone")
                transport.write(frame)
                rec["deltas_sent"] = i + 1
                if transport.get_write_buffer_size() > 0x10000:
                    await request.writer.drain()
        if stop_at == drop_at:
            return await self._flush_and_drop(request, rec)
        await resp.write_eof(error_ev if stop_at == error_at else tail)
        self._finish(rec, completed=True)
        return resp

    async def _flush_and_drop(self, request: web.Request, rec: dict) -> web.StreamResponse:
        # abort() discards unsent bytes; wait until the N deltas are with the kernel so the client sees them.
        # With a high-water mark of 0 the transport pauses the protocol while anything is buffered, and the
        # writer's drain() returns once the buffer is empty again.
        transport = request.transport
        if transport is not None and not transport.is_closing():
            transport.set_write_buffer_limits(high=0)
            await request.writer.drain()
        return self._drop(request, rec)

    # -- routes ------------------------------------------------------------------------------------------

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, "openai", lambda req, rec: self._completion(req, rec, "openai"))

    async def _anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(
            request, "anthropic", lambda req, rec: self._completion(req, rec, "anthropic")
        )

    async def _models(self, request: web.Request) -> web.StreamResponse:
        h = request.headers
        provider = "anthropic" if ("x-api-key" in h or "anthropic-version" in h) else "openai"

        async def handler(req: web.Request, rec: dict) -> web.StreamResponse:
            self._check_auth(req, provider)
            if provider == "openai":
                data = [
                    {"id": m, "object": "model", "created": _CREATED, "owned_by": "system"}
                    for m in OPENAI_MODELS
                ]
                return await self._send_json(req, rec, 200, {"object": "list", "data": data}, {})
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
                for m in ANTHROPIC_MODELS
            ]
            page = {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
            return await self._send_json(req, rec, 200, page, {})

        return await self._guarded(request, provider, handler)

    async def _unknown(self, request: web.Request) -> web.StreamResponse:
        h = request.headers
        provider = "anthropic" if ("x-api-key" in h or "anthropic-version" in h) else "openai"

        async def handler(req: web.Request, rec: dict) -> web.StreamResponse:
            if provider == "openai":
                err = openai_error(404, f"Invalid URL ({req.method} {req.path})", code=None)
            else:
                err = anthropic_error(404, f"Not found: {req.method} {req.path}")
            return await self._send_json(req, rec, 404, err, {})

        return await self._guarded(request, provider, handler)

    def _control(self, request: web.Request) -> None:
        self._control_conns.add(request.protocol)

    async def _ctl_behaviour(self, request: web.Request) -> web.Response:
        self._control(request)
        try:
            params = await request.json()
            if not isinstance(params, dict):
                raise ValueError("expected a JSON object")
            params = dict(params)
            provider = params.pop("provider", None)
            count = params.pop("count", None)
            set_to = self.set_behaviour(provider, params, count)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True, "behaviour": set_to})

    async def _ctl_reset(self, request: web.Request) -> web.Response:
        self._control(request)
        self.reset()
        return web.json_response({"ok": True})

    async def _ctl_requests(self, request: web.Request) -> web.Response:
        self._control(request)
        provider = request.query.get("provider")
        recs = [r for r in self.records if provider is None or r["provider"] == provider]
        return web.Response(body=_enc(recs), content_type="application/json")

    async def _ctl_stats(self, request: web.Request) -> web.Response:
        self._control(request)
        return web.Response(body=_enc(self.stats()), content_type="application/json")


class _Pacer:
    """One stream's pre-framed deltas, written to its transport one per tick of a shared :class:`_Ticker`.

    `done` resolves after the last frame, or fails with ConnectionResetError when the transport closes first;
    the handler awaits it (and cancels it when the client goes away, which takes the pacer off its ticker)."""

    __slots__ = ("done", "frames", "i", "rec", "transport")

    def __init__(self, transport: asyncio.Transport, frames: list[bytes], rec: dict) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport = transport
        self.frames = frames
        self.rec = rec
        self.i = 0

    def step(self) -> bool:
        """Write the next frame; False once this pacer is finished (or cancelled)."""
        if self.done.done():
            return False
        if self.transport.is_closing():
            self.done.set_exception(ConnectionResetError("client gone"))
            return False
        self.transport.write(self.frames[self.i])
        self.i += 1
        self.rec["deltas_sent"] = self.i
        if self.i == len(self.frames):
            self.done.set_result(None)
            return False
        return True


class _Ticker:
    """Fires every `period` seconds at t0 + k * period and steps every pacer that has joined.

    Streams with the same interval whose first delta falls in the same millisecond of the period share one
    ticker, so pacing 1,000 streams costs a few timers per period instead of one timer per delta: that, and
    frames encoded up front, is what lets one process push tens of thousands of paced events per second.
    Each stream still sees `period` between its deltas, and its first delta comes `period` to `period` + 1 ms
    after the head."""

    __slots__ = ("active", "k", "key", "loop", "pending", "period", "registry", "t0")

    def __init__(self, registry: dict, key: tuple, period: float, t0: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.registry = registry
        self.key = key
        self.period = period
        self.t0 = t0
        self.k = 0  # the next tick fires at t0 + k * period
        self.active: list[_Pacer] = []
        self.pending: dict[int, list[_Pacer]] = {}
        registry[key] = self
        self.loop.call_at(t0, self._fire)

    @staticmethod
    def pace(registry: dict, pacer: _Pacer, period: float) -> None:
        """Schedule `pacer`'s first frame `period` seconds from now (up to 1 ms later, never earlier)."""
        due = asyncio.get_running_loop().time() + period
        width = min(0.001, period)
        phase = due % period
        bucket = int(phase / width)
        first = due - phase + (bucket + 1) * width  # the end of due's bucket: >= due, < due + width
        ticker = registry.get((period, bucket)) or _Ticker(registry, (period, bucket), period, first)
        k = max(ticker.k, round((first - ticker.t0) / period))
        ticker.pending.setdefault(k, []).append(pacer)

    def _fire(self) -> None:
        joining = self.pending.pop(self.k, None)
        if joining:
            self.active.extend(joining)
        self.k += 1
        self.active = [p for p in self.active if p.step()]
        if self.active or self.pending:
            self.loop.call_at(self.t0 + self.k * self.period, self._fire)
        else:
            del self.registry[self.key]


# ----------------------------------------------------------------------------------------------------
# Wire formats


def _openai_usage(ans: _Answer) -> dict:
    return {
        "prompt_tokens": ans.input_tokens,
        "completion_tokens": ans.output_tokens,
        "total_tokens": ans.input_tokens + ans.output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _openai_message(ans: _Answer) -> dict:
    return {
        "id": ans.msg_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": ans.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(ans.deltas),
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": ans.finish,
            }
        ],
        **({} if ans.omit_usage else {"usage": _openai_usage(ans)}),
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }


def _openai_events(ans: _Answer, b: Behaviour) -> tuple[bytes, list[bytes], bytes, bytes]:
    """Pre-encoded SSE events: (head, one per delta, tail, in-stream error)."""
    common = {
        "id": ans.msg_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": ans.model,
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }

    def chunk(delta: dict, finish: str | None) -> bytes:
        obj = {**common, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if ans.include_usage:
            obj["usage"] = None
        return b"data: " + _enc(obj) + b"\n\n"

    head = chunk({"role": "assistant", "content": "", "refusal": None}, None)
    # every delta chunk is the same JSON but for the text: encode the frame once, splice each text in
    prefix, _, suffix = chunk({"content": "\x00"}, None).partition(b'"\\u0000"')
    deltas = [prefix + _enc(d) + suffix for d in ans.deltas]
    tail = chunk({}, ans.finish)
    if ans.include_usage:
        tail += b"data: " + _enc({**common, "choices": [], "usage": _openai_usage(ans)}) + b"\n\n"
    tail += b"data: [DONE]\n\n"
    err = openai_error(
        500, b.error_message or "The server had an error while processing your request.", b.error_type
    )
    return head, deltas, tail, b"data: " + _enc(err) + b"\n\n"


def _anthropic_usage(ans: _Answer) -> dict:
    return {
        "input_tokens": 0 if ans.omit_usage else ans.input_tokens,
        "output_tokens": 0 if ans.omit_usage else ans.output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "service_tier": "standard",
    }


def _anthropic_message(ans: _Answer) -> dict:
    return {
        "id": ans.msg_id,
        "type": "message",
        "role": "assistant",
        "model": ans.model,
        "content": [{"type": "text", "text": "".join(ans.deltas)}],
        "stop_reason": ans.finish,
        "stop_sequence": None,
        "usage": _anthropic_usage(ans),
    }


def _sse(event: str, data: dict) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _enc(data) + b"\n\n"


def _anthropic_events(ans: _Answer, b: Behaviour) -> tuple[bytes, list[bytes], bytes, bytes]:
    start = {
        "id": ans.msg_id,
        "type": "message",
        "role": "assistant",
        "model": ans.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**_anthropic_usage(ans), "output_tokens": 0 if ans.omit_usage else 1},
    }
    head = (
        _sse("message_start", {"type": "message_start", "message": start})
        + _sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
        + b'event: ping\ndata: {"type": "ping"}\n\n'
    )
    frame = _sse(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "\x00"}},
    )
    prefix, _, suffix = frame.partition(b'"\\u0000"')
    deltas = [prefix + _enc(d) + suffix for d in ans.deltas]
    tail = (
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
        + _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": ans.finish, "stop_sequence": None},
                "usage": {"output_tokens": 0 if ans.omit_usage else ans.output_tokens},
            },
        )
        + _sse("message_stop", {"type": "message_stop"})
    )
    err = anthropic_error(529, b.error_message or "Overloaded", b.error_type or "overloaded_error")
    return head, deltas, tail, _sse("error", err)


# ----------------------------------------------------------------------------------------------------
# The pytest-side handle


# The control calls go to 127.0.0.1 directly, whatever *_proxy variables say.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class FakeUpstream:
    """A handle on a fake upstream: started in a background thread (``start()``) or attached to one in
    another process (``FakeUpstream.connect(url)``). Every method goes through the HTTP control API, so both
    work the same."""

    def __init__(
        self,
        openai_key: str = DEFAULT_OPENAI_KEY,
        anthropic_key: str = DEFAULT_ANTHROPIC_KEY,
        *,
        max_records: int = 10_000,
        keyless_openai: bool = False,
    ) -> None:
        self.openai_key = openai_key
        self.anthropic_key = anthropic_key
        self._max_records = max_records
        self._keyless_openai = keyless_openai
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: FakeServer | None = None
        self.url = ""

    @classmethod
    def connect(
        cls, url: str, openai_key: str = DEFAULT_OPENAI_KEY, anthropic_key: str = DEFAULT_ANTHROPIC_KEY
    ) -> FakeUpstream:
        """A handle on a fake already running at `url` (its own process); stop() is then a no-op."""
        fake = cls(openai_key, anthropic_key)
        fake.url = url.rstrip("/")
        return fake

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    def start(self) -> FakeUpstream:
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = FakeServer(
                    self.openai_key, self.anthropic_key, self._max_records, self._keyless_openai
                )
                port = loop.run_until_complete(self._server.start())
                self.url = f"http://127.0.0.1:{port}"
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._server.stop())
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake upstream did not start within 10 s")
        if failure:
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start() if self._thread is None and not self.url else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control -----------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with _NO_PROXY.open(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            if exc.code == 400:
                raise ValueError(json.loads(detail).get("error", detail)) from None
            raise RuntimeError(f"fake upstream control {path}: {exc.code} {detail}") from None

    def behave(self, provider: str, *, count: int | None = None, **params: Any) -> None:
        """Set the behaviour for `provider`'s completion requests (see :class:`Behaviour` for the parameters).

        ``count=None``: the standing behaviour until reset (replaces the previous standing one).
        ``count=N``: for the next N completion requests only, on top of the standing behaviour; several such
        calls queue up in order. Requests refused for auth or validation do not use up a count.
        """
        self._call("POST", "/_control/behaviour", {"provider": provider, "count": count, **params})

    def reset(self) -> None:
        """Forget behaviours, records and totals."""
        self._call("POST", "/_control/reset", {})

    def requests(self, provider: str | None = None) -> list[dict[str, Any]]:
        query = (
            "" if provider is None else "?" + urllib.parse.urlencode({"provider": _provider_name(provider)})
        )
        return self._call("GET", "/_control/requests" + query)

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/_control/stats")

    def open_connections(self) -> int:
        """TCP connections currently open to the fake, control connections excluded."""
        return self.stats()["open_connections"]

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float = 5.0) -> Any:
        """Poll `predicate(records)` until it returns something truthy (returned) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.requests()
            result = predicate(records)
            if result:
                return result
            if time.monotonic() >= deadline:
                summary = [
                    {
                        k: r[k]
                        for k in ("seq", "provider", "path", "status", "completed", "client_gone", "dropped")
                    }
                    for r in records[-10:]
                ]
                raise TimeoutError(f"condition not met within {timeout} s; last records: {summary}")
            time.sleep(0.01)  # polling interval under a deadline


# ----------------------------------------------------------------------------------------------------
# As its own process


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard)
            )


async def _serve(args: argparse.Namespace) -> None:
    server = FakeServer(args.openai_key, args.anthropic_key, args.max_records)
    port = await server.start(args.host, args.port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"LISTENING http://{host}:{port}", flush=True)
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        tls_port = await server.add_tls_site(context, args.host, args.tls_port)
        print(f"LISTENING_TLS https://{host}:{tls_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--openai-key", default=DEFAULT_OPENAI_KEY)
    parser.add_argument("--anthropic-key", default=DEFAULT_ANTHROPIC_KEY)
    parser.add_argument(
        "--max-records", type=int, default=10_000, help="request records kept (oldest dropped)"
    )
    parser.add_argument("--tls-cert", help="PEM certificate (chain): also serve TLS on a second port")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert (default: in the same file)")
    parser.add_argument("--tls-port", type=int, default=0, help="the TLS port (0 picks a free one)")
    args = parser.parse_args(argv)
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    _raise_fd_limit()
    asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
