"""The log: every line through one path to a writer thread; a stalled stdout never stalls a caller;
LOG_FILE survives logrotate; nothing queued is lost at shutdown."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pwachat.logging import log_access, setup_logging
from pwachat.settings import Settings
from server import clean_env


def ours() -> logging.Handler:
    (handler,) = [h for h in logging.getLogger().handlers if getattr(h, "_pwachat", False)]
    return handler


@pytest.fixture
def install() -> Iterator[object]:
    """`install(**env)`: `setup_logging` with those settings; our handler is removed afterwards."""

    def factory(**env: str) -> logging.Handler:
        setup_logging(Settings.from_mapping({"LOG_FILE": "", **env}))
        return ours()

    yield factory
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_pwachat", False)]:
        root.removeHandler(handler)
        handler.close()


def access(rid: str, **more: object) -> None:
    log_access(
        {"request_id": rid, "method": "GET", "path": "/api/health", "status": 200, "duration_ms": 0.1, **more}
    )


def flushed(handler: logging.Handler, path: Path, needle: str) -> str:
    """The file's text once `needle` is in it (the writer is asked to flush, then polled)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        handler.flush()
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        time.sleep(0.01)
    raise AssertionError(f"{needle!r} never reached {path}")


def test_a_stdout_nobody_reads_never_blocks_the_caller(install, monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()  # a 64 KiB pipe buffer: full after a few hundred lines
    stream = open(w, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    monkeypatch.setattr(sys, "stdout", stream)
    handler = install()
    total = 20_000  # twice the queue's bound

    def produce() -> None:
        for i in range(total):
            access(f"r{i}")

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    producer.join(15)
    stalled = producer.is_alive()

    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(r, 65536), b"")), daemon=True)
    reader.start()
    try:
        assert not stalled, "log_access blocked on a stdout nobody reads"
        # Once stdout is read again: every line is either written or counted in a warning.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            handler.flush()
            complete = b"".join(chunks).decode().split("\n")[:-1]  # the reader may be mid-line
            records = [json.loads(ln) for ln in complete]
            written = sum(1 for rec in records if rec["logger"] == "pwachat.access")
            drops = [rec for rec in records if rec.get("event") == "log_lines_dropped"]
            if written + sum(d["dropped"] for d in drops) == total:
                break
            time.sleep(0.01)
        assert drops and all(d["level"] == "WARNING" and d["dropped"] > 0 for d in drops)
        assert written + sum(d["dropped"] for d in drops) == total
        assert written >= 10_000  # the queue's bound, at least, was kept
    finally:
        root = logging.getLogger()
        root.removeHandler(handler)
        handler.close()
        stream.close()
        reader.join(5)
        os.close(r)


def test_a_filter_on_the_handler_sees_the_access_line(
    install, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # One path for every line: what can be done to any record (a filter here) applies to the
    # access line too, also when ours is the only handler (the server as run, not as under pytest).
    log_file = tmp_path / "app.log"
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # without pytest's own handlers
    handler = install(LOG_FILE=str(log_file))
    try:

        class HideHealth(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                return getattr(record, "path", None) != "/api/health"

        handler.addFilter(HideHealth())
        access("hidden-1")
        log_access({"request_id": "shown-1", "method": "POST", "path": "/api/chat", "status": 200})
        text = flushed(handler, log_file, "shown-1")
        assert "hidden-1" not in text
    finally:
        handler.close()


def test_the_access_line_is_a_record_with_its_fields(install, caplog: pytest.LogCaptureFixture) -> None:
    install()
    with caplog.at_level(logging.INFO, logger="pwachat.access"):
        access("caplog-1", provider="echo")
    (record,) = [r for r in caplog.records if getattr(r, "request_id", None) == "caplog-1"]
    assert (record.name, record.levelname, record.getMessage()) == ("pwachat.access", "INFO", "request")
    assert (record.method, record.path, record.status, record.provider) == ("GET", "/api/health", 200, "echo")
    assert abs(record.created - time.time()) < 5 and record.process == os.getpid()


def test_caplog_sees_the_access_line_of_an_in_process_request(make_client, caplog) -> None:
    client = make_client()
    with caplog.at_level(logging.INFO, logger="pwachat.access"):
        assert client.get("/api/health", headers={"X-Request-ID": "caplog-2"}).status_code == 200
    mine = [r for r in caplog.records if getattr(r, "request_id", None) == "caplog-2"]
    assert mine and mine[0].status == 200 and mine[0].path == "/api/health"


def test_ordinary_records_keep_their_message_and_trace(install, tmp_path: Path) -> None:
    log_file = tmp_path / "app.log"
    handler = install(LOG_FILE=str(log_file))
    args = ["first"]
    logging.getLogger("pwachat.test").warning("value %s", args, extra={"event": "e1"})
    args[0] = "changed"  # the line says what the value was when it was logged
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("pwachat.test").exception("failed")
    text = flushed(handler, log_file, '"failed"')
    first, second = (json.loads(ln) for ln in text.splitlines())
    assert (first["msg"], first["event"], first["level"]) == ("value ['first']", "e1", "WARNING")
    assert second["msg"] == "failed" and "RuntimeError: boom" in second["trace"]


def test_log_file_moved_or_removed_is_reopened(install, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "app.log"
    handler = install(LOG_FILE=str(log_file))
    access("before-move")
    flushed(handler, log_file, "before-move")
    rotated = log_file.with_name("app.log.1")
    log_file.rename(rotated)  # what logrotate does (without copytruncate)
    access("after-move")
    text = flushed(handler, log_file, "after-move")
    assert "before-move" not in text
    assert "after-move" not in rotated.read_text()
    log_file.unlink()
    access("after-unlink")
    assert "after-move" not in flushed(handler, log_file, "after-unlink")


def test_closing_writes_everything_queued(install, tmp_path: Path) -> None:
    log_file = tmp_path / "app.log"
    handler = install(LOG_FILE=str(log_file))
    for i in range(3000):
        access(f"close-{i}")
    logging.getLogger().removeHandler(handler)
    handler.close()
    ids = [json.loads(ln)["request_id"] for ln in log_file.read_text().splitlines()]
    assert ids == [f"close-{i}" for i in range(3000)]


EXITS = {
    "interpreter exit": "",
    # Granian's workers: forked, and ended by multiprocessing with os._exit (no atexit).
    "forked worker": """
import multiprocessing
p = multiprocessing.get_context("fork").Process(target=work, args=("child",))
p.start(); p.join()
""",
}


@pytest.mark.parametrize("how", list(EXITS))
def test_lines_queued_at_exit_are_written(tmp_path: Path, how: str) -> None:
    log_file = tmp_path / "app.log"
    script = f"""
import logging
from pwachat.logging import log_access, setup_logging
from pwachat.settings import Settings
setup_logging(Settings.from_mapping({{"LOG_FILE": {str(log_file)!r}}}))
def work(who):
    for i in range(5000):
        log_access({{"request_id": f"{{who}}-{{i}}", "status": 200}})
    logging.getLogger("pwachat.test").warning("last", extra={{"who": who}})
work("parent")
{EXITS[how]}
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=clean_env(), capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    records = [json.loads(ln) for ln in log_file.read_text().splitlines()]
    for who in ["parent", "child"] if how == "forked worker" else ["parent"]:
        ids = [r["request_id"] for r in records if r.get("request_id", "").startswith(f"{who}-")]
        assert ids == [f"{who}-{i}" for i in range(5000)]
        assert any(r["msg"] == "last" and r["who"] == who for r in records)
    assert len(done.stdout.splitlines()) == len(records)  # the same lines on stdout, none twice
