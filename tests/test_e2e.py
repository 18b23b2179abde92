"""End to end: the real `pwachat serve` process (Granian + the app), spoken to over sockets."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from reference import parse_sse
from server import (
    PWACHAT,
    Server,
    children,
    clean_env,
    read_all,
    split_response,
    sse_request,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.e2e

MARKER = "zebra-quartz-4711"  # chat text that must never show up in logs or error bodies


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("e2e"), RATELIMIT_PER_MINUTE="1000")
    yield srv
    stop_server(srv)


def stream(srv: Server, payload: dict, headers: str = "") -> tuple[int, dict[str, str], bytes]:
    sock = sse_request(srv.port, json.dumps(payload).encode(), headers)
    with sock:
        return split_response(read_all(sock))


def test_stream_is_the_contracts_event_sequence(server: Server) -> None:
    status, headers, body = stream(server, {"message": "hi there"})
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    events, _ = parse_sse(body)
    kinds = [e.type for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert set(kinds[1:-1]) == {"delta"}
    assert [int(e.last_event_id) for e in events] == list(range(len(events)))
    start = json.loads(events[0].data)
    assert start["provider"] == "echo" and start["model"] == "echo" and start["id"].startswith("chat_")
    text = "".join(json.loads(e.data)["content"] for e in events[1:-1])
    assert text == "You said: hi there"
    done = json.loads(events[-1].data)
    assert done["finish_reason"] == "stop"
    assert done["usage"]["output_tokens"] == len(events) - 2
    # Framing: LF line ends only, every event ended by a blank line.
    assert b"\r" not in body and body.endswith(b"\n\n")


def test_stream_and_chat_answer_the_same_text(server: Server) -> None:
    message = "Multi\r\nline \u202eboth\u202c ways  "
    status, _, raw = server.post_json("/api/chat", {"message": message})
    assert status == 200
    answer = json.loads(raw)["response"]
    _, _, body = stream(server, {"message": message})
    events, _ = parse_sse(body)
    assert "".join(json.loads(e.data)["content"] for e in events if e.type == "delta") == answer
    assert answer == "You said: Multi\nline both ways"


def test_every_response_has_the_security_headers_and_no_server_banner(server: Server) -> None:
    for method, path in [("GET", "/api/health"), ("GET", "/api/nowhere"), ("DELETE", "/api/chat")]:
        _, headers, _ = server.request(method, path)
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert headers["cross-origin-opener-policy"] == "same-origin"
        assert headers["cache-control"] == "no-store"
        assert headers.get("server", "") == ""
        assert len(headers["x-request-id"]) >= 16


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code"),
    [
        (b'{"message": ', "application/json", 400, "invalid_json"),
        (b'{"message": 5}', "application/json", 400, "invalid_request"),
        (b'{"message": "x", "role": "system"}', "application/json", 400, "invalid_request"),
        (b'{"message": "\\u0000\\u202e "}', "application/json", 400, "invalid_request"),
        (b'{"message": "x", "provider": "nope"}', "application/json", 400, "unknown_provider"),
        (b'{"message": "x", "provider": "openai"}', "application/json", 503, "provider_not_configured"),
        (b'{"message": "x"}', "text/plain", 415, "unsupported_media_type"),
        (b'{"message": "' + b"a" * 300_000 + b'"}', "application/json", 413, "payload_too_large"),
    ],
)
def test_bad_input_over_the_wire(server: Server, body: bytes, ctype: str, status: int, code: str) -> None:
    body = body.replace(b'"x"', json.dumps(MARKER).encode())
    got, headers, raw = server.request("POST", "/api/chat", body, {"Content-Type": ctype})
    assert got == status
    err = json.loads(raw)["error"]
    assert err["code"] == code
    assert err["request_id"] == headers["x-request-id"]
    assert MARKER not in raw.decode()
    assert "Traceback" not in raw.decode() and ".py" not in raw.decode()


def test_request_id_is_echoed_or_replaced(server: Server) -> None:
    _, headers, _ = server.request("GET", "/api/health", headers={"X-Request-ID": "client-id.1:2_3"})
    assert headers["x-request-id"] == "client-id.1:2_3"
    _, headers, _ = server.request("GET", "/api/health", headers={"X-Request-ID": "bad id/with space"})
    assert headers["x-request-id"] != "bad id/with space"


def test_log_lines_are_json_and_never_hold_chat_text(server: Server) -> None:
    status, _, _ = server.post_json("/api/chat", {"message": MARKER}, **{"X-Request-ID": "log-check-1"})
    assert status == 200
    log_file = server.app_log
    # The access line is written when the response finishes; poll for it with a deadline.
    lines = wait_for_line(log_file, "log-check-1")
    records = [json.loads(line) for line in lines]
    mine = [r for r in records if r.get("request_id") == "log-check-1"]
    assert mine and mine[0]["method"] == "POST" and mine[0]["path"] == "/api/chat"
    assert mine[0]["status"] == 200 and mine[0]["provider"] == "echo" and mine[0]["duration_ms"] >= 0
    assert (mine[0]["logger"], mine[0]["level"], mine[0]["msg"]) == ("pwachat.access", "INFO", "request")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", mine[0]["ts"])
    assert list(mine[0])[:4] == ["ts", "level", "logger", "msg"]
    deadline = time.monotonic() + 10  # the same line on stdout (the writer thread's next write)
    while "log-check-1" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.02)  # polling with a deadline
    assert "log-check-1" in server.output()
    assert MARKER not in log_file.read_text()
    assert MARKER not in server.output()


def wait_for_line(path: Path, needle: str) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            if any(needle in ln for ln in lines):
                return lines
        time.sleep(0.02)
    raise AssertionError(f"no log line with {needle!r} in {path}")


def run_cli(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PWACHAT, "serve"], cwd=tmp_path, env=clean_env(**env), capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"PORT": "abc"}, "PORT"),
        ({"RATELIMIT_PER_MINUTE": "ten"}, "RATELIMIT_PER_MINUTE"),
        ({"RATELIMIT_PER_HOUR": "0"}, "RATELIMIT_PER_HOUR"),
        ({"APP_ENV": "staging"}, "APP_ENV"),
        ({"TEMPERATURE": "2.5"}, "TEMPERATURE"),
        ({"REDIS_URL": "http://user:hunter2@example"}, "REDIS_URL"),
        ({"APP_ENV": "production"}, "SECRET_KEY"),
    ],
)
def test_bad_configuration_stops_start_up_with_one_line(
    tmp_path: Path, env: dict[str, str], name: str
) -> None:
    done = run_cli(tmp_path, **env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0]
    assert "hunter2" not in done.stderr and "Traceback" not in done.stderr


def test_dotenv_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("RATELIMIT_PER_MINUTE=2\nRATELIMIT_PER_HOUR=7\n")
    srv = start_server(tmp_path, RATELIMIT_PER_HOUR="9")
    try:
        status, _, raw = srv.request("GET", "/api/rate-limit")
        assert status == 200
        assert json.loads(raw)["limits"] == {"per_minute": 2, "per_hour": 9, "per_day": 500}
    finally:
        stop_server(srv)


def test_workers_setting_starts_that_many_workers(tmp_path: Path) -> None:
    srv = start_server(tmp_path, WORKERS="2")
    try:
        assert len(children(srv.proc.pid)) == 2
        statuses = [srv.post_json("/api/chat", {"message": "hi"})[0] for _ in range(6)]
        assert statuses == [200] * 6
    finally:
        stop_server(srv)


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_a_client_leaving_half_way_through_its_body_breaks_nothing(server: Server, path: str) -> None:
    # Content-Length promises 1,000 bytes, 10 arrive, the client goes: no 5xx or trace in the log,
    # and the next request is served as usual.
    import socket

    before = server.output()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\nX-Request-ID: half-body-1\r\n\r\n".encode()
            + b'{"message"'
        )
    lines = wait_for_line(server.app_log, "half-body-1")
    mine = [json.loads(ln) for ln in lines if "half-body-1" in ln]
    assert all(r.get("status", 0) < 500 for r in mine)
    new_output = server.output()[len(before) :]
    assert "Traceback" not in new_output and '"level":"ERROR"' not in new_output
    status, _, _ = server.post_json("/api/chat", {"message": "still here"})
    assert status == 200
