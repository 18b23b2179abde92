"""The log of the real `pwachat serve`: a stdout nobody reads, logrotate, several workers, shutdown."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from server import PWACHAT, Server, clean_env, free_port, start_server, stop_server

pytestmark = pytest.mark.e2e


def wait_for(path: Path, needle: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        time.sleep(0.02)
    raise AssertionError(f"no {needle!r} in {path}")


def test_a_stdout_nobody_reads_does_not_stall_requests(tmp_path: Path) -> None:
    # stdout is a pipe the test does not read until the end: its 64 KiB buffer is full after a few
    # hundred access lines (as with a stuck `docker logs` reader or journald).
    port = free_port()
    app_log = tmp_path / "app.log"
    env = clean_env(PORT=str(port), HOST="127.0.0.1", LOG_FILE=str(app_log), RATELIMIT_PER_MINUTE="100000")
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(
            [*PWACHAT, "serve"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    srv = Server(port, proc, tmp_path / "stderr", app_log)
    drained: list[bytes] = []
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        deadline = time.monotonic() + 30
        while True:  # readiness, polled with a deadline
            try:
                conn.request("GET", "/api/health/live")
                conn.getresponse().read()
                break
            except OSError:
                conn.close()
                assert time.monotonic() < deadline and proc.poll() is None, srv.output()
                time.sleep(0.05)
        answered = 0
        deadline = time.monotonic() + 120
        for i in range(2000):
            assert time.monotonic() < deadline, f"only {answered} of 2000 answered in time"
            try:
                conn.request("GET", "/api/health/live", headers={"X-Request-ID": f"pipe-{i}"})
                resp = conn.getresponse()
                resp.read()
            except TimeoutError:
                pytest.fail(f"request {i} not answered within 10 s: the server stalled on its log")
            assert resp.status == 200
            answered += 1
        conn.close()
        assert answered == 2000
        # Once stdout is read again, the lines queued meanwhile (fewer than the queue holds) follow.
        reader = threading.Thread(target=lambda: drained.extend(iter(lambda: proc.stdout.read1(65536), b"")))
        reader.daemon = True
        reader.start()
        text = wait_for(app_log, '"pipe-1999"', timeout=20)
        ids = [json.loads(ln).get("request_id") for ln in text.splitlines()]
        assert [i for i in ids if i and i.startswith("pipe-")] == [f"pipe-{i}" for i in range(2000)]
        assert "Traceback" not in srv.output()
    finally:
        stop_server(srv)
        proc.stdout.close()


def test_log_file_moved_away_while_serving_lands_in_a_new_file(tmp_path: Path) -> None:
    srv = start_server(tmp_path)
    try:
        assert srv.request("GET", "/api/health", headers={"X-Request-ID": "rotate-1"})[0] == 200
        wait_for(srv.app_log, "rotate-1")
        rotated = srv.app_log.with_name(srv.app_log.name + ".1")
        srv.app_log.rename(rotated)  # logrotate's default (create, no copytruncate)
        assert srv.request("GET", "/api/health", headers={"X-Request-ID": "rotate-2"})[0] == 200
        text = wait_for(srv.app_log, "rotate-2")
        assert "rotate-1" not in text
        assert "rotate-2" not in rotated.read_text()
        assert json.loads(text.splitlines()[-1])["request_id"] == "rotate-2"
    finally:
        stop_server(srv)


def test_workers_share_the_log_file_line_by_line(tmp_path: Path) -> None:
    srv = start_server(tmp_path, WORKERS="2", RATELIMIT_PER_MINUTE="100000")
    ids = [f"shared-{i}" for i in range(400)]
    try:

        def hit(part: list[str]) -> None:
            for rid in part:
                assert srv.request("GET", "/api/health/live", headers={"X-Request-ID": rid})[0] == 200

        threads = [threading.Thread(target=hit, args=(ids[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        deadline = time.monotonic() + 10
        while True:
            records = [json.loads(ln) for ln in srv.app_log.read_text().splitlines()]  # every line whole
            seen = {r.get("request_id") for r in records}
            if seen >= set(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert seen >= set(ids)
    finally:
        stop_server(srv)


def test_lines_are_written_before_the_server_exits(tmp_path: Path) -> None:
    srv = start_server(tmp_path, RATELIMIT_PER_MINUTE="100000")
    try:
        for i in range(200):
            assert srv.request("GET", "/api/health/live", headers={"X-Request-ID": f"last-{i}"})[0] == 200
        os.kill(srv.proc.pid, signal.SIGTERM)
        srv.proc.wait(30)
        lines = srv.app_log.read_text().splitlines()
        ids = [json.loads(ln).get("request_id") for ln in lines]
        assert [i for i in ids if i and i.startswith("last-")] == [f"last-{i}" for i in range(200)]
    finally:
        stop_server(srv)
