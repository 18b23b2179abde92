"""End to end: the drain on SIGTERM (pwachat/drain.py), against the real `pwachat serve` process and
the fake upstream, over raw sockets.

One drain is observed by all the tests of this module: the server relays a short stream, a long
one and one whose provider never answers its head, has an idle keep-alive connection and two
connections whose request heads are half sent, when it gets SIGTERM. What each of them then sees
is recorded once (`drained`), and each test checks one part of the contract's "Hosting" rules.

What Granian itself does on the signal (and these tests pin): it stops accepting at once (new
connections are refused), closes idle keep-alive connections, and serves what is under way with
`Connection: close`. The requests that still reach the app are the ones whose heads were arriving.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fake_upstream import FakeUpstream
from server import Server, poll, split_response, sse_request, start_server, stop_server

pytestmark = pytest.mark.e2e

OPENAI_KEY = "sk-test-drain"
GRACE_S = 3.0
SHORT_CHUNKS = 15  # 0.1 s apart: ends about 1.5 s after it starts, within the grace
LONG_CHUNKS = 300  # 30 s: far longer than the grace


class Reader:
    """What one socket has received so far; reads with a deadline, never more than it needs."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""
        self.closed = False
        self.ended_at: float | None = None

    def until(self, needle: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while needle not in self.data and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False
            except OSError:  # reset
                chunk = b""
            if not chunk:
                self.closed = True
                self.ended_at = time.monotonic()
            self.data += chunk
        return needle in self.data

    def to_end(self, timeout: float) -> bool:
        self.until(b"\x00never\x00", timeout)
        return self.closed


@dataclass
class Drained:
    server: Server
    sigterm_at: float
    refused_at: float | None = None
    alive_when_refused: bool = False
    exit_code: int | None = None
    exited_at: float | None = None
    streams: dict[str, Reader] = field(default_factory=dict)
    answers: dict[str, bytes] = field(default_factory=dict)
    answered_at: dict[str, float] = field(default_factory=dict)
    keep_alive: bytes | None = None
    upstream: list[dict] = field(default_factory=list)
    app_log: list[dict] = field(default_factory=list)


def _rx_queue(server_port: int, client: socket.socket) -> int | None:
    """Bytes from `client` the server has not read yet (the kernel's receive queue of the
    server's end of that connection), from /proc/net/tcp; None until the connection is listed."""
    client_port = client.getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local, remote, queues = cols[1], cols[2], cols[4]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return int(queues.split(":")[1], 16)
    return None


def _half_sent(port: int, head: bytes) -> socket.socket:
    """A new connection with the first half of a request head sent, read by the server."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head[: len(head) // 2])
    poll(lambda: _rx_queue(port, sock) == 0, 5, "the server to read the half-sent head", interval=0.01)
    return sock


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


CHAT_HEAD = (
    b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"X-Request-ID: drain-chat\r\nContent-Length: 34\r\n\r\n"
    b'{"message":"hi","provider":"echo"}'
)
HEALTH_HEAD = b"GET /api/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: drain-health\r\n\r\n"


@pytest.fixture(scope="module")
def drained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drained]:
    with FakeUpstream(OPENAI_KEY) as fake:
        srv = start_server(
            tmp_path_factory.mktemp("drain"),
            OPENAI_API_KEY=OPENAI_KEY,
            OPENAI_BASE_URL=fake.openai_base_url,
            UPSTREAM_MAX_RETRIES="0",
            SSE_HEARTBEAT_S="0.5",
            SHUTDOWN_GRACE_S=str(GRACE_S),
            RATELIMIT_PER_MINUTE="1000",
        )
        try:
            yield _drain(srv, fake)
        finally:
            stop_server(srv)


def _stream(srv: Server, rid: str) -> Reader:
    body = json.dumps({"message": "tell me a story", "provider": "openai"}).encode()
    return Reader(sse_request(srv.port, body, f"X-Request-ID: {rid}\r\n"))


def _drain(srv: Server, fake: FakeUpstream) -> Drained:
    # In the order the requests reach the fake: the short stream, the long one, the silent one.
    fake.behave("openai", count=1, chunks=SHORT_CHUNKS, chunk_interval_s=0.1)
    fake.behave("openai", count=1, chunks=LONG_CHUNKS, chunk_interval_s=0.1)
    fake.behave("openai", count=1, head_delay_s=60)
    idle = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    idle.sendall(b"GET /api/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert Reader(idle).until(b'"ok"', 5)  # answered; the connection stays open, idle
    streams = {}
    for name in ("short", "long"):
        streams[name] = _stream(srv, f"drain-{name}")
        assert streams[name].until(b"event: delta", 5), streams[name].data
    streams["silent"] = _stream(srv, "drain-silent")
    assert streams["silent"].until(b": ping", 5), streams["silent"].data  # committed, no head yet
    half = {"chat": _half_sent(srv.port, CHAT_HEAD), "health": _half_sent(srv.port, HEALTH_HEAD)}

    run = Drained(srv, time.monotonic())
    srv.proc.send_signal(signal.SIGTERM)
    poll(lambda: _refused(srv.port), 5, "new connections to be refused", interval=0.01)
    run.refused_at = time.monotonic()
    run.alive_when_refused = srv.proc.poll() is None
    heads = {"chat": CHAT_HEAD, "health": HEALTH_HEAD}
    for name, sock in half.items():
        sock.sendall(heads[name][len(heads[name]) // 2 :])
        reader = Reader(sock)
        reader.to_end(5)
        run.answers[name] = reader.data
        run.answered_at[name] = time.monotonic()
    try:
        idle.sendall(b"GET /api/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reader = Reader(idle)
        reader.to_end(5)
        run.keep_alive = reader.data
    except OSError:
        run.keep_alive = b""  # already closed and reset
    for reader in streams.values():
        reader.to_end(GRACE_S + 5)
    run.streams = streams
    try:
        run.exit_code = srv.proc.wait(GRACE_S + 5)
        run.exited_at = time.monotonic()
    except Exception:
        pass
    run.upstream = fake.requests()
    if srv.app_log.exists():
        run.app_log = [json.loads(line) for line in srv.app_log.read_text().splitlines()]
    return run


def _events(reader: Reader) -> list[dict]:
    status, _, body = split_response(reader.data)
    assert status == 200, reader.data[:300]
    out = []
    for block in body.decode().split("\n\n"):
        ev: dict = {}
        for line in block.split("\n"):
            key, _, value = line.partition(": ")
            if key in ("id", "event", "data"):
                ev[key] = value
        if "event" in ev:
            out.append(ev)
    return out


def test_a_stream_that_ends_within_the_grace_finishes_with_done_while_the_drain_refuses_new_requests(
    drained: Drained,
) -> None:
    events = _events(drained.streams["short"])
    assert [e["event"] for e in events] == ["start", *["delta"] * SHORT_CHUNKS, "done"]
    assert json.loads(events[-1]["data"])["finish_reason"] == "stop"
    # It was still running when the drain was already answering 503: the drain let it finish.
    assert drained.answers["chat"].startswith(b"HTTP/1.1 503"), drained.answers["chat"][:200]
    assert drained.answered_at["chat"] < drained.streams["short"].ended_at


def test_a_stream_longer_than_the_grace_ends_with_an_error_event_shutting_down(drained: Drained) -> None:
    reader = drained.streams["long"]
    assert reader.closed, "the long stream did not end"
    events = _events(reader)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and set(kinds[1:-1]) == {"delta"} and kinds[-1] == "error", kinds
    assert len(kinds) - 2 < LONG_CHUNKS  # cut short
    last = events[-1]
    assert int(last["id"]) == int(events[-2]["id"]) + 1  # the stream's next id
    err = json.loads(last["data"])["error"]
    assert err["code"] == "shutting_down" and err["message"], err
    assert err["request_id"] == "drain-long"
    ended_after = reader.ended_at - drained.sigterm_at
    assert GRACE_S - 0.5 <= ended_after <= GRACE_S + 1.5, ended_after
    # The provider request was cut too: the fake upstream saw its connection close, near the grace.
    rec = drained.upstream[1]
    assert rec["deltas_sent"] < LONG_CHUNKS and not rec["completed"]
    assert rec["client_gone"] and rec["gone_at"] - drained.sigterm_at <= GRACE_S + 1.5, rec


def test_a_stream_still_waiting_for_its_head_at_the_grace_end_ends_with_shutting_down(
    drained: Drained,
) -> None:
    reader = drained.streams["silent"]
    assert reader.closed, "the stream waiting for its head did not end"
    events = _events(reader)
    assert [e["event"] for e in events] == ["start", "error"]
    assert json.loads(events[-1]["data"])["error"]["code"] == "shutting_down"
    assert drained.upstream[2]["client_gone"], drained.upstream[2]  # its provider request cancelled


@pytest.mark.parametrize(("name", "rid"), [("chat", "drain-chat"), ("health", "drain-health")])
def test_a_request_arriving_on_an_open_connection_after_sigterm_gets_503_shutting_down(
    drained: Drained, name: str, rid: str
) -> None:
    # The rest of its head came after the signal: the app answers it, and says it is leaving (the
    # health route too: a load balancer that still gets through learns it).
    status, headers, body = split_response(drained.answers[name])
    assert status == 503, drained.answers[name][:300]
    assert headers["retry-after"] == "5"
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json" and headers["x-request-id"] == rid
    err = json.loads(body)["error"]
    assert err == {"code": "shutting_down", "message": err["message"], "request_id": rid}
    # An idle keep-alive connection is closed by Granian at the signal, without an answer: its
    # client opens a new connection (refused here, so it goes to another instance).
    assert drained.keep_alive == b""


def test_new_connections_are_refused_once_the_signal_is_in(drained: Drained) -> None:
    assert drained.refused_at is not None and drained.refused_at - drained.sigterm_at < 2
    assert drained.alive_when_refused  # refused by the draining process, not because it had gone


def test_the_process_exits_with_status_0_within_the_grace_plus_a_few_seconds(drained: Drained) -> None:
    assert drained.exit_code == 0, drained.server.output()[-2000:]
    assert drained.exited_at - drained.sigterm_at <= GRACE_S + 3


def test_the_access_lines_of_the_drained_requests_are_written_before_the_exit(drained: Drained) -> None:
    assert drained.exit_code is not None  # read after the exit
    lines = {
        rec["request_id"]: rec
        for rec in drained.app_log
        if rec.get("logger") == "pwachat.access" and str(rec.get("request_id", "")).startswith("drain-")
    }
    assert lines["drain-short"]["status"] == 200 and "error" not in lines["drain-short"]
    assert lines["drain-short"]["finish_reason"] == "stop"
    assert lines["drain-long"]["status"] == 200 and lines["drain-long"]["error"] == "shutting_down"
    assert lines["drain-silent"]["error"] == "shutting_down"
    assert lines["drain-chat"]["status"] == 503 and lines["drain-health"]["status"] == 503
    drain_lines = [rec for rec in drained.app_log if rec.get("logger") == "pwachat.drain"]
    assert drain_lines, "no line says that the process drained"
