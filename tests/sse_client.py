"""An SSE client for the tests: a raw socket to the real server, read incrementally (the head, then
one item per blank-line block, each stamped with when its bytes arrived)."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Any

from reference import parse_sse
from server import Server, sse_request

__all__ = ["Item", "SseReader", "begin", "delta_text", "events", "open_stream", "resume_stream", "stream"]


@dataclass(frozen=True)
class Item:
    kind: str  # "event" or "comment"
    name: str  # the event type, or the comment's text
    data: str
    id: str
    at: float  # time.monotonic() when the bytes that completed it were read


class SseReader:
    """Reads a POST /api/chat/stream answer incrementally: the head, then one item per blank-line block."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""  # everything after the head, transfer coding undone
        self.eof = False
        self._raw = b""
        self._chunked = False
        self._pending = b""
        self._queue: list[Item] = []

    def _recv(self, deadline: float) -> tuple[bytes, float]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the server sent nothing in time")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        return data, time.monotonic()

    def read_head(self, timeout: float = 15.0) -> tuple[int, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self._raw:
            data, _ = self._recv(deadline)
            if not data:
                raise AssertionError(f"connection closed before the response head: {self._raw!r}")
            self._raw += data
        head, _, rest = self._raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        self._raw = b""
        if rest:
            self._feed(rest, time.monotonic())
        return self.status, self.headers

    def _feed(self, data: bytes, at: float) -> None:
        """Take what one recv() returned (b"" is the end of the connection)."""
        if not data:
            self.eof = True
        self._raw += data
        if self._chunked:
            while True:
                size_line, sep, rest = self._raw.partition(b"\r\n")
                if not sep:
                    break
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    self.eof = True
                    self._raw = b""
                    break
                if len(rest) < size + 2:
                    break
                self._add(rest[:size])
                self._raw = rest[size + 2 :]
        else:
            self._add(self._raw)
            self._raw = b""
        while b"\n\n" in self._pending:
            block, _, self._pending = self._pending.partition(b"\n\n")
            events, comments = parse_sse(block + b"\n\n")
            self._queue += [Item("comment", c, "", "", at) for c in comments]
            self._queue += [Item("event", e.type, e.data, e.last_event_id, at) for e in events]

    def _add(self, data: bytes) -> None:
        self.body += data
        self._pending += data

    def next_item(self, timeout: float = 15.0) -> Item | None:
        """The next event or comment; None once the stream has ended."""
        deadline = time.monotonic() + timeout
        while not self._queue:
            if self.eof:
                return None
            self._feed(*self._recv(deadline))
        return self._queue.pop(0)

    def read_events(self, count: int, timeout: float = 15.0) -> list[Item]:
        """Read until `count` events have arrived (comments included in what is returned)."""
        items: list[Item] = []
        while sum(i.kind == "event" for i in items) < count:
            item = self.next_item(timeout)
            assert item is not None, f"the stream ended early: {items}"
            items.append(item)
        return items

    def read_rest(self, timeout: float = 20.0) -> list[Item]:
        deadline = time.monotonic() + timeout
        items = []
        while (item := self.next_item(deadline - time.monotonic())) is not None:
            items.append(item)
        return items


def open_stream(srv: Server, payload: dict[str, Any], request_id: str | None = None) -> SseReader:
    headers = f"X-Request-ID: {request_id}\r\n" if request_id else ""
    return SseReader(sse_request(srv.port, json.dumps(payload).encode(), headers))


def stream(
    srv: Server, payload: dict[str, Any], request_id: str | None = None
) -> tuple[int, dict[str, str], list[Item], bytes]:
    reader = open_stream(srv, payload, request_id)
    with reader.sock:
        status, headers = reader.read_head()
        items = reader.read_rest()
    return status, headers, items, reader.body


def events(items: list[Item]) -> list[Item]:
    return [i for i in items if i.kind == "event"]


def resume_stream(srv: Server, chat_id: str, headers: str = "", query: str = "") -> SseReader:
    """`GET /api/chat/stream/{chat_id}` (resume), `headers` as raw `Name: value\r\n` lines."""
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    sock.sendall(
        f"GET /api/chat/stream/{chat_id}{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
        "Connection: close\r\n\r\n".encode()
    )
    return SseReader(sock)


def begin(srv: Server, headers: str = "") -> tuple[SseReader, str]:
    """A stream started (an OpenAI one) and its `start` event read: (the reader, the stream's id)."""
    payload = json.dumps({"message": "tell me", "provider": "openai"}).encode()
    reader = SseReader(sse_request(srv.port, payload, headers))
    status, _ = reader.read_head()
    assert status == 200, status
    start = events(reader.read_events(1))[0]
    assert start.name == "start" and start.id == "0", start
    return reader, json.loads(start.data)["id"]


def delta_text(items: list[Item]) -> str:
    """The text of the `delta` events among `items`."""
    return "".join(json.loads(i.data)["content"] for i in events(items) if i.name == "delta")
