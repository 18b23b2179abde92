"""The container image, run by compose with Redis and checked over real HTTP (`make test-container`).

Skipped unless PWACHAT_CONTAINER_TESTS=1: it needs a Docker daemon, the image (`PWACHAT_IMAGE`,
built by `make image`), a Redis image (`REDIS_IMAGE`) and Compose v2 (`PWACHAT_COMPOSE`). The
stack is compose.yaml with compose.hostnet.yaml: two app services and Redis on the host's network,
every address on 127.0.0.1 (no bridge network is made). Ports are picked free for each run.

The drain on `docker stop` is checked on containers of their own (`docker run --network host`, the
compose service's hardening and stop timeout), relaying the fake upstream (tests/fake_upstream.py,
on 127.0.0.1 in this process), so that stopping them leaves the shared stack alone.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fake_upstream import FakeUpstream
from pwachat.cli import KILL_MARGIN_S
from pwachat.settings import Settings
from server import poll

if os.environ.get("PWACHAT_CONTAINER_TESTS") != "1":
    pytest.skip(
        "container tests run with PWACHAT_CONTAINER_TESTS=1 (make test-container)", allow_module_level=True
    )

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("PWACHAT_IMAGE", "pwachat:latest")
COMPOSE = [
    *shlex.split(os.environ.get("PWACHAT_COMPOSE", "docker compose")),
    "--project-directory",
    str(ROOT),
    "-p",
    f"pwachat-ctest-{os.getpid()}",
    "-f",
    str(ROOT / "compose.yaml"),
    "-f",
    str(ROOT / "compose.hostnet.yaml"),
]
LIMIT = 5
CHAT_TOKEN = "ctest-chat"  # the echo chat and stream
LIMIT_TOKEN = "ctest-limit"  # the shared-limit burst, with a quota of its own
START_TIMEOUT_S = 120


def run(*cmd: str, check: bool = True, timeout: float = 60, env: dict[str, str] | None = None):
    return subprocess.run(
        cmd, check=check, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class Stack:
    urls: tuple[str, str]  # app, app2
    containers: tuple[str, str]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    port_a, port_b, port_redis = free_ports(3)
    env = {
        **os.environ,
        "PWACHAT_IMAGE": IMAGE,
        "PWACHAT_TEST_PORT_A": str(port_a),
        "PWACHAT_TEST_PORT_B": str(port_b),
        "PWACHAT_TEST_REDIS_PORT": str(port_redis),
        "PWACHAT_TEST_RATELIMIT_PER_MINUTE": str(LIMIT),
        "PWACHAT_TEST_API_TOKENS": f"{CHAT_TOKEN},{LIMIT_TOKEN}",
    }
    try:
        # --wait: until Redis's healthcheck and both apps' HEALTHCHECK (the image's) say healthy.
        up = run(
            *COMPOSE,
            "up",
            "-d",
            "--no-build",
            "--wait",
            "--wait-timeout",
            str(START_TIMEOUT_S),
            env=env,
            check=False,
            timeout=START_TIMEOUT_S + 30,
        )
        if up.returncode != 0:
            logs = run(*COMPOSE, "logs", "--no-color", "--tail", "60", env=env, check=False)
            pytest.fail(f"compose up failed:\n{up.stderr}\n{logs.stdout}{logs.stderr}")
        ids = tuple(run(*COMPOSE, "ps", "-q", svc, env=env).stdout.strip() for svc in ("app", "app2"))
        assert all(ids), ids
        yield Stack(urls=(f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"), containers=ids)
    finally:
        run(*COMPOSE, "down", "-v", "--timeout", "30", env=env, check=False, timeout=120)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_image_metadata() -> None:
    config = json.loads(run("docker", "image", "inspect", IMAGE).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["StopSignal"] == "SIGTERM"
    assert "/api/health/live" in " ".join(config["Healthcheck"]["Test"])
    assert config["Cmd"] == ["pwachat", "serve"]
    assert {"HOST=0.0.0.0", "PORT=5000", "LOG_FILE="} <= set(config["Env"])


def test_health_on_both_instances_with_shared_redis(stack: Stack) -> None:
    for url, container in zip(stack.urls, stack.containers, strict=True):
        live = httpx.get(f"{url}/api/health/live", timeout=5)
        assert live.status_code == 200 and live.json() == {"status": "ok"}
        health = httpx.get(f"{url}/api/health", timeout=5).json()
        assert health["rate_limit"] == {"backend": "redis", "redis": "ok"}
        assert health["providers"]["echo"]["configured"] is True
        state = run("docker", "inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip()
        assert state == "healthy"


def test_echo_chat(stack: Stack) -> None:
    resp = httpx.post(
        f"{stack.urls[0]}/api/chat",
        json={"message": "hello from a container", "provider": "echo"},
        headers=auth(CHAT_TOKEN),
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["provider"] == "echo"
    assert body["response"] == "You said: hello from a container"
    assert resp.headers["X-RateLimit-Limit"] == str(LIMIT)


def test_echo_stream(stack: Stack, parse_sse) -> None:
    with httpx.stream(
        "POST",
        f"{stack.urls[1]}/api/chat/stream",
        json={"message": "stream me some words", "provider": "echo"},
        headers=auth(CHAT_TOKEN),
        timeout=10,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-accel-buffering"] == "no"
        events = parse_sse(resp.read())
    kinds = [e.event for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}, kinds
    text = "".join(json.loads(e.data)["content"] for e in events if e.event == "delta")
    assert text == "You said: stream me some words"


def test_every_process_runs_as_non_root(stack: Stack) -> None:
    for container in stack.containers:
        assert run("docker", "exec", container, "id", "-u").stdout.strip() == "10001"
        # The server itself (PID 1, Granian's workers), not only what `docker exec` starts.
        uids = run(
            "docker",
            "exec",
            container,
            "python",
            "-c",
            "import glob; print(sorted({open(p).read().split('Uid:')[1].split()[0] "
            "for p in glob.glob('/proc/[0-9]*/status')}))",
        ).stdout.strip()
        assert uids == "['10001']"


def test_read_only_root_file_system(stack: Stack) -> None:
    for container in stack.containers:
        assert (
            run("docker", "inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", container).stdout.strip()
            == "true"
        )
        write = run("docker", "exec", container, "sh", "-c", "echo x > /app/probe", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr
        # /tmp is the tmpfs compose.yaml mounts; the server serves (the tests above) with nothing else.
        assert run("docker", "exec", container, "sh", "-c", "echo x > /tmp/probe").returncode == 0


def test_logs_go_to_stdout_as_json(stack: Stack) -> None:
    out = run("docker", "logs", stack.containers[0]).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert lines and all("level" in line and "msg" in line for line in lines)


def test_two_instances_sharing_redis_admit_exactly_the_limit(stack: Stack) -> None:
    statuses = []
    for i in range(12):
        resp = httpx.post(
            f"{stack.urls[i % 2]}/api/chat",
            json={"message": f"burst {i}", "provider": "echo"},
            headers=auth(LIMIT_TOKEN),
            timeout=10,
        )
        statuses.append(resp.status_code)
    assert Counter(statuses) == {200: LIMIT, 429: 12 - LIMIT}, statuses
    # Alternating: both instances admitted some, so the quota was shared, not merely per instance.
    assert 200 in statuses[0::2] and 200 in statuses[1::2]


def test_image_has_no_compiler() -> None:
    probe = "command -v cc gcc c++ g++ clang rustc cargo ld"
    found = run("docker", "run", "--rm", "--network", "none", IMAGE, "sh", "-c", probe, check=False)
    assert found.stdout.strip() == "", found.stdout
    assert found.returncode != 0
    # The same probe finds what is there: the check can fail.
    python = run("docker", "run", "--rm", "--network", "none", IMAGE, "sh", "-c", "command -v python")
    assert python.stdout.strip() == "/opt/pwachat/bin/python"


# ---------------------------------------------------------------------------------------------
# The drain on `docker stop` (API.md "Hosting"): SIGTERM reaches the server as PID 1 of the
# container, running streams get SHUTDOWN_GRACE_S, and the container exits 0 before Docker's own
# stop timeout would kill it.

DRAIN_OPENAI_KEY = "sk-ctest-drain"
SHORT_CHUNKS = 30  # 0.1 s apart: about 3 s, far within the default grace
LONG_CHUNKS = 300  # 30 s: far longer than SHORT_GRACE_S
SHORT_GRACE_S = 2.0
_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ms|us|µs|ns|h|m|s)")
_UNIT_S = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def duration_s(text: str) -> float:
    """A Compose duration ("30s", "1m30s"; Go's syntax, which `compose config` writes) in seconds."""
    parts = _DURATION.findall(text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def compose_services() -> dict:
    """The services as Compose resolves them, for the stack these tests run."""
    env = {**os.environ, "PWACHAT_IMAGE": IMAGE}
    return json.loads(run(*COMPOSE, "config", "--format", "json", env=env).stdout)["services"]


def shutdown_grace_s(environment: dict[str, str] | None) -> float:
    env = environment or {}
    return Settings.from_mapping({k: env[k] for k in ("SHUTDOWN_GRACE_S",) if k in env}).shutdown_grace_s


def test_compose_stop_grace_period_outlasts_the_drain_and_the_kill_margin() -> None:
    # Docker kills the container when stop_grace_period is over; Granian kills a worker that is
    # still there ceil(SHUTDOWN_GRACE_S) + KILL_MARGIN_S after the signal (cli.py). Docker's kill
    # must come after both, or the streams ended at the grace's end lose their last event.
    services = compose_services()
    for name in ("app", "app2"):
        svc = services[name]
        grace = shutdown_grace_s(svc.get("environment"))
        stop = duration_s(svc["stop_grace_period"])
        assert stop > math.ceil(grace) + KILL_MARGIN_S, (name, svc["stop_grace_period"], grace)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(DRAIN_OPENAI_KEY) as upstream:
        yield upstream


class StreamRecorder(threading.Thread):
    """One POST /api/chat/stream read to its end in the background: what arrived, and when it ended."""

    def __init__(self, url: str, request_id: str) -> None:
        super().__init__(name=f"stream-{request_id}", daemon=True)
        self.url = url
        self.request_id = request_id
        self.raw = b""
        self.status: int | None = None
        self.failure: BaseException | None = None
        self.ended_at: float | None = None
        self.first_delta = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST",
                f"{self.url}/api/chat/stream",
                json={"message": "tell me a long story", "provider": "openai"},
                headers={"X-Request-ID": self.request_id},
                timeout=10,
            ) as resp:
                self.status = resp.status_code
                for chunk in resp.iter_raw():
                    self.raw += chunk
                    if b"event: delta" in self.raw:
                        self.first_delta.set()
        except httpx.HTTPError as exc:
            self.failure = exc
        finally:
            self.ended_at = time.monotonic()
            self.first_delta.set()  # nobody waits for a delta that will not come


@dataclass
class Stopped:
    stream: StreamRecorder
    grace_s: float
    stop_timeout_s: int
    stop_at: float  # `docker stop` started
    refused_at: float  # the container refused new connections: the drain had begun
    running_when_refused: bool  # the stream had not ended then
    stopped_at: float  # `docker stop` returned
    stop_returncode: int
    state: dict  # docker inspect's State, after the exit
    drain_log: list[str]  # the app's pwachat.drain lines
    upstream: dict  # the fake upstream's record of the stream's provider request


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _live(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/health/live", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop_while_streaming(fake: FakeUpstream, name: str, chunks: int, grace_s: float | None) -> Stopped:
    """Run the image alone, start a paced stream through it, `docker stop` it mid-stream, and
    record what the stream, the container and the upstream saw."""
    (port,) = free_ports(1)
    app = compose_services()["app"]
    stop_timeout = math.ceil(duration_s(app["stop_grace_period"]))  # what compose gives the app
    env = {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_FILE": "",
        "OPENAI_API_KEY": DRAIN_OPENAI_KEY,
        "OPENAI_BASE_URL": fake.openai_base_url,  # 127.0.0.1: the container shares the host's network
        "UPSTREAM_MAX_RETRIES": "0",
        "RATELIMIT_PER_MINUTE": "1000",
    }
    if grace_s is not None:
        env["SHUTDOWN_GRACE_S"] = str(grace_s)
    container = f"pwachat-ctest-{os.getpid()}-{name}"
    run(
        "docker",
        "run",
        "-d",
        "--name",
        container,
        "--network",
        "host",
        # As compose.yaml runs the app.
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges:true",
        "--stop-timeout",
        str(stop_timeout),
        *(a for k, v in env.items() for a in ("-e", f"{k}={v}")),
        IMAGE,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if _live(url):
                return True
            if run("docker", "inspect", "-f", "{{.State.Running}}", container).stdout.strip() != "true":
                pytest.fail(f"{name}: the container exited:\n{run('docker', 'logs', container).stdout}")
            return False

        poll(ready, START_TIMEOUT_S, f"{name}: the container to answer", interval=0.1)
        fake.behave("openai", count=1, chunks=chunks, chunk_interval_s=0.1)
        stream = StreamRecorder(url, f"ctest-drain-{name}")
        stream.start()
        assert stream.first_delta.wait(10) and stream.ended_at is None, (stream.raw, stream.failure)

        stop_at = time.monotonic()
        stopper = subprocess.Popen(
            ["docker", "stop", container], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            poll(lambda: _refused(port), 10, f"{name}: new connections to be refused", interval=0.01)
            refused_at = time.monotonic()
            running_when_refused = stream.ended_at is None
            stream.join(stop_timeout + 10)
            stop_returncode = stopper.wait(stop_timeout + 10)
            stopped_at = time.monotonic()
        finally:
            stopper.kill()  # only if still waiting (a failed check above); harmless once it has exited
            stopper.wait()

        state = json.loads(run("docker", "inspect", container).stdout)[0]["State"]
        drain_log = []
        for line in run("docker", "logs", container).stdout.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                if rec.get("logger") == "pwachat.drain":
                    drain_log.append(rec["msg"])
        upstream = fake.requests("openai")[-1]  # this stream's: one provider request per test
        return Stopped(
            stream=stream,
            grace_s=shutdown_grace_s(env),
            stop_timeout_s=stop_timeout,
            stop_at=stop_at,
            refused_at=refused_at,
            running_when_refused=running_when_refused,
            stopped_at=stopped_at,
            stop_returncode=stop_returncode,
            state=state,
            drain_log=drain_log,
            upstream=upstream,
        )
    finally:
        run("docker", "rm", "-f", container, check=False)


def _kinds(stopped: Stopped, parse_sse: Callable) -> tuple[list, list[str]]:
    stream = stopped.stream
    assert stream.failure is None and stream.status == 200, (stream.failure, stream.raw[:300])
    events = parse_sse(stream.raw)
    return events, [e.event for e in events]


def test_docker_stop_lets_a_running_stream_finish_within_the_grace_and_exits_0(
    fake: FakeUpstream, parse_sse
) -> None:
    # The default SHUTDOWN_GRACE_S (25), as compose runs it.
    stopped = stop_while_streaming(fake, "finish", SHORT_CHUNKS, None)
    # The stop came while the stream ran: the container refused new connections before it ended,
    # the provider was still sending after that, and the worker counted it when the signal came.
    assert stopped.running_when_refused
    assert stopped.upstream["finished_at"] > stopped.refused_at, stopped.upstream
    assert any("1 streams get" in msg for msg in stopped.drain_log), stopped.drain_log
    events, kinds = _kinds(stopped, parse_sse)
    assert kinds == ["start", *["delta"] * SHORT_CHUNKS, "done"], kinds
    assert json.loads(events[-1].data)["finish_reason"] == "stop"
    assert stopped.upstream["completed"], stopped.upstream
    # Within the grace, and the container left as soon as its stream had: it did not wait out the
    # grace, and Docker did not kill it (that would be exit 137).
    assert stopped.stream.ended_at - stopped.stop_at < stopped.grace_s
    assert stopped.stopped_at - stopped.stop_at < stopped.grace_s
    assert stopped.stop_returncode == 0
    assert stopped.state["Status"] == "exited" and not stopped.state["OOMKilled"], stopped.state
    assert stopped.state["ExitCode"] == 0, stopped.state


def test_docker_stop_ends_a_stream_longer_than_the_grace_with_shutting_down_and_exits_0(
    fake: FakeUpstream, parse_sse
) -> None:
    stopped = stop_while_streaming(fake, "cut", LONG_CHUNKS, SHORT_GRACE_S)
    assert stopped.running_when_refused
    events, kinds = _kinds(stopped, parse_sse)
    assert kinds[0] == "start" and set(kinds[1:-1]) == {"delta"} and kinds[-1] == "error", kinds
    assert len(kinds) - 2 < LONG_CHUNKS  # cut short
    err = json.loads(events[-1].data)["error"]
    assert err["code"] == "shutting_down" and err["request_id"] == "ctest-drain-cut", err
    ended_after = stopped.stream.ended_at - stopped.stop_at
    assert SHORT_GRACE_S - 0.5 <= ended_after <= SHORT_GRACE_S + 1.5, ended_after
    assert any("1 streams ended with shutting_down" in msg for msg in stopped.drain_log), stopped.drain_log
    # Its provider request was closed too, not left running.
    assert stopped.upstream["client_gone"] and not stopped.upstream["completed"], stopped.upstream
    # Out well before Docker's stop timeout: exit 0, not killed.
    assert stopped.stopped_at - stopped.stop_at < math.ceil(SHORT_GRACE_S) + KILL_MARGIN_S + 2
    assert stopped.stopped_at - stopped.stop_at < stopped.stop_timeout_s
    assert stopped.stop_returncode == 0
    assert stopped.state["Status"] == "exited" and not stopped.state["OOMKilled"], stopped.state
    assert stopped.state["ExitCode"] == 0, stopped.state
