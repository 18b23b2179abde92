"""The container image, run by compose with Redis and checked over real HTTP (`make test-container`).

Skipped unless PWACHAT_CONTAINER_TESTS=1: it needs a Docker daemon, the image (`PWACHAT_IMAGE`,
built by `make image`), a Redis image (`REDIS_IMAGE`) and Compose v2 (`PWACHAT_COMPOSE`). The
stack is compose.yaml with compose.hostnet.yaml: two app services and Redis on the host's network,
every address on 127.0.0.1 (no bridge network is made). Ports are picked free for each run.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

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
