"""End to end at the request's edges: a reader that leaves before the stream is committed, a body
that trickles in, and a bug in the native extension. The real `pwachat serve` process, the fake
upstream, raw sockets.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from fake_upstream import FakeUpstream
from server import Server, poll, split_response, sse_request, start_server, stop_server

pytestmark = pytest.mark.e2e

OPENAI_KEY = "sk-test-edges"
ANTHROPIC_KEY = "sk-ant-test-edges"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(OPENAI_KEY, ANTHROPIC_KEY) as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def _fresh_fake(fake: FakeUpstream) -> Iterator[None]:
    fake.reset()
    yield
    fake.reset()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    """A long heartbeat (the head wait lasts up to 10 s) and a short body deadline (1 s)."""
    server = start_server(
        tmp_path_factory.mktemp("edges"),
        OPENAI_API_KEY=OPENAI_KEY,
        OPENAI_BASE_URL=fake.openai_base_url,
        ANTHROPIC_API_KEY=ANTHROPIC_KEY,
        ANTHROPIC_BASE_URL=fake.anthropic_base_url,
        UPSTREAM_MAX_RETRIES="0",
        SSE_HEARTBEAT_S="10",
        REQUEST_BODY_TIMEOUT_S="1",
        RATELIMIT_PER_MINUTE="8",
    )
    yield server
    stop_server(server)


def health_runtime(server: Server) -> dict:
    return json.loads(server.request("GET", "/api/health")[2])["runtime"]


# -- a reader that leaves before the stream is committed ------------------------------------------


@pytest.mark.parametrize(("provider", "upstream"), [("openai", "openai"), ("claude", "anthropic")])
def test_a_reader_leaving_during_the_head_wait_cancels_the_upstream_within_one_second(
    srv: Server, fake: FakeUpstream, provider: str, upstream: str
) -> None:
    # The provider answers its head only after 8 s; the server waits for it up to SSE_HEARTBEAT_S
    # (10 s) before committing, so the reader leaves while nothing has been sent to it yet.
    fake.behave(upstream, head_delay_s=8.0)
    before = health_runtime(srv)
    sock = sse_request(srv.port, json.dumps({"message": "hi", "provider": provider}).encode())
    with sock:
        poll(lambda: fake.requests(), 5, "the provider request")
    left_at = time.monotonic()
    rec = fake.wait_for(lambda rs: rs and rs[0]["finished_at"] is not None and rs[0], timeout=10)
    assert rec["client_gone"], rec
    assert rec["gone_at"] - left_at <= 1.0, rec["gone_at"] - left_at
    assert rec["head_sent_at"] is None  # the provider never got to answer
    # Nothing stays behind in the worker: no task, no open stream.
    poll(
        lambda: (now := health_runtime(srv))["tasks"] <= before["tasks"] and now["open_streams"] == 0,
        5,
        "the worker's tasks back to where they were",
    )
    line = access_line(srv, "/api/chat/stream", lambda f: f.get("client_gone"))
    assert line["client_gone"] is True and line["provider"] == provider
    # Answering nobody is not a failure: no error line from the server or from Granian.
    assert not [raw for raw in srv.output().splitlines() if '"ERROR"' in raw or "Traceback" in raw]


def access_line(server: Server, path: str, match) -> dict:
    def find() -> dict | None:
        if not server.app_log.exists():
            return None
        for raw in reversed(server.app_log.read_text().splitlines()):
            rec = json.loads(raw)
            if rec.get("logger") == "pwachat.access" and rec.get("path") == path and match(rec):
                return rec
        return None

    return poll(find, 5, f"an access line for {path}")


# -- a body that trickles in ---------------------------------------------------------------------


def _head(length: int) -> bytes:
    return (
        b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n\r\n"
    )


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_body_that_trickles_in_is_refused_with_408_and_costs_no_quota(
    srv: Server, fake: FakeUpstream
) -> None:
    body = json.dumps({"message": "hello there", "provider": "openai"}).encode()
    socks = []
    try:
        # More slow bodies than the rate limit's quota: each is refused on its own deadline, and
        # none of them is counted against the caller.
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            sock.sendall(_head(len(body)) + body[:5])  # then nothing more
            socks.append(sock)
        started = time.monotonic()
        for sock in socks:
            status, headers, payload = split_response(_read_response(sock, 10))
            assert status == 408, payload
            err = json.loads(payload)["error"]
            assert err["code"] == "request_timeout" and err["request_id"] == headers["x-request-id"]
            assert "hello" not in payload.decode()
        assert time.monotonic() - started < 8  # each ended at its own ~1 s deadline, not the client's
    finally:
        for sock in socks:
            sock.close()
    assert fake.requests() == []  # the provider never saw them
    # The quota (8 a minute, 2 spent above) is whole: three chats are admitted after the five
    # slow bodies.
    for _ in range(3):
        status, _, payload = srv.post_json("/api/chat", {"message": "hi", "provider": "openai"})
        assert status == 200, payload


def test_a_body_that_arrives_in_pieces_within_the_deadline_is_served(srv: Server, fake: FakeUpstream) -> None:
    body = json.dumps({"message": "pieces", "provider": "openai"}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(_head(len(body)))
        for i in range(0, len(body), 7):
            sock.sendall(body[i : i + 7])
        status, _, payload = split_response(_read_response(sock, 10))
    assert status == 200, payload
    assert json.loads(payload)["provider"] == "openai"
