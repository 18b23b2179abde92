"""Start the real `pwachat serve` process on a free port and talk to it over sockets."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PWACHAT = [sys.executable, "-m", "pwachat.cli"]


#: Every variable pwachat reads; stripped from the parent's environment so tests start from defaults.
OUR_VARIABLES = frozenset(
    """APP_ENV FLASK_ENV SECRET_KEY HOST PORT WORKERS OPENAI_API_KEY OPENAI_BASE_URL ANTHROPIC_API_KEY
    ANTHROPIC_BASE_URL OPENAI_MODELS ANTHROPIC_MODELS DEFAULT_PROVIDER ECHO_PROVIDER SYSTEM_PROMPT REDIS_URL
    RATELIMIT_PER_MINUTE RATELIMIT_PER_HOUR RATELIMIT_PER_DAY API_TOKENS TRUSTED_PROXIES CORS_ORIGINS
    MAX_TOKENS TEMPERATURE MAX_MESSAGE_CHARS MAX_HISTORY_MESSAGES MAX_BODY_BYTES UPSTREAM_TIMEOUT_S
    SSE_HEARTBEAT_S UPSTREAM_MAX_RETRIES REQUEST_BODY_TIMEOUT_S MAX_CONCURRENCY SHUTDOWN_GRACE_S LOG_LEVEL
    LOG_FILE METRICS_TOKEN PWACHAT_METRICS_DIR PROVIDERS OPENAI_FALLBACK CLAUDE_FALLBACK
    ANTHROPIC_FALLBACK PROVIDER_BREAKER_S HTTPS_PROXY HTTP_PROXY NO_PROXY https_proxy http_proxy
    no_proxy STREAM_GRACE_S STREAM_RETAIN_S STREAM_MEMORY_MB TOKENS_PER_DAY TOKENS_GLOBAL_PER_DAY""".split()
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**overrides: str) -> dict[str, str]:
    """The parent's environment minus anything pwachat reads, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in OUR_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path  # the process's stdout and stderr
    app_log: Path  # LOG_FILE
    host: str = "127.0.0.1"

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post_json(self, path: str, payload: object, **headers: str) -> tuple[int, dict[str, str], bytes]:
        return self.request(
            "POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers}
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_server(tmp: Path, **env: str) -> Server:
    port = free_port()
    out = tmp / f"server-{port}.out"
    app_log = tmp / f"app-{port}.log"
    full_env = clean_env(PORT=str(port), HOST="127.0.0.1", LOG_FILE=str(app_log), **env)
    with open(out, "wb") as sink:
        # Its own process group, so that stopping it stops its workers too, whatever state they are in.
        proc = subprocess.Popen(
            [*PWACHAT, "serve"],
            cwd=tmp,
            env=full_env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(port, proc, out, app_log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
        try:
            status, _, _ = server.request("GET", "/api/health/live")
            if status == 200:
                return server
        except OSError:
            pass
        time.sleep(0.05)  # polling for readiness with a deadline, not synchronisation by sleep
    stop_server(server)
    raise RuntimeError(f"server did not become ready:\n{server.output()}")


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """`predicate()`'s first truthy value, asked every `interval` until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)  # polling interval under a deadline


def children(pid: int) -> list[int]:
    """Direct child processes of `pid`, read from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def stop_server(server: Server) -> None:
    """SIGTERM (Granian's graceful stop), then SIGKILL for whatever of the group is left."""
    group = server.proc.pid
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)  # a worker still finishing its streams


def access_line(server: Server, request_id: str) -> dict[str, Any]:
    """This request's access log line in the server's LOG_FILE (written once its response ended)."""

    def find() -> dict[str, Any] | None:
        if not server.app_log.exists():
            return None
        for line in server.app_log.read_text().splitlines():
            if request_id in line:
                rec = json.loads(line)
                if rec.get("logger") == "pwachat.access" and rec.get("request_id") == request_id:
                    return rec
        return None

    return poll(find, 10.0, f"the access line of {request_id}")


def sse_request(port: int, payload: bytes, headers: str = "") -> socket.socket:
    """Open a raw socket and send a POST /api/chat/stream; the caller reads the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /api/chat/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + headers.encode()
        + b"Content-Length: "
        + str(len(payload)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + payload
    )
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def dechunk(body: bytes) -> bytes:
    """Undo HTTP/1.1 chunked transfer coding."""
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    return status, headers, body


def iter_lines(text: str) -> Iterator[str]:
    yield from text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
