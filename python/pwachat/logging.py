"""JSON log lines to stdout and `LOG_FILE`, written by a thread, never by the event loop.

One line per request (request id, method, path, status, duration and what the route added, such as
provider, model and sizes), never chat text, tokens or keys: the routes only ever add counts and
names to a request's log fields.

Every line, the access line included, is a `LogRecord` that goes through the logging machinery
(filters, other handlers such as pytest's caplog) to `LogWriter`, which queues it and returns. Its
thread formats the records and writes them, in batches of whole lines, to `LOG_FILE` and stdout:
a slow reader of stdout (docker, journald) delays the log, never a request. The queue is bounded;
when it is full, lines are dropped and counted, and one warning says how many once there is room
again. `LOG_FILE` is reopened when it was moved or removed (logrotate), and the queue is drained at
shutdown: at the end of a (forked) worker process, by `logging.shutdown` at exit, by `flush_logging`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import sys
import threading
import time
import traceback
import weakref
from pathlib import Path
from typing import Any

import msgspec

from pwachat.settings import Settings

__all__ = ["JsonFormatter", "LogWriter", "access_log", "flush_logging", "log_access", "setup_logging"]

_encode = msgspec.json.Encoder(enc_hook=str).encode

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

access_log = logging.getLogger("pwachat.access")
_log = logging.getLogger("pwachat.logging")

#: Lines waiting for the writer at most; past that they are dropped (and counted), never waited for.
MAX_QUEUED_LINES = 10_000
#: Lines formatted and written at once by the writer thread.
BATCH_LINES = 512
#: How long a flush (shutdown) waits for the writer: a stdout nobody reads must not hang the exit.
FLUSH_TIMEOUT_S = 5.0

_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def _timestamp(created: float, msecs: float) -> str:
    global _second
    cached = _second
    second = int(created)
    if cached[0] != second:
        cached = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int(msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created, record.msecs),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # A copy: another handler (pytest's caplog) may add attributes while the writer reads them.
        for key, value in vars(record).copy().items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        trace = record.exc_text
        if not trace and record.exc_info and record.exc_info[1] is not None:
            trace = "".join(traceback.format_exception(*record.exc_info))
        if trace:
            line["trace"] = trace
        return _encode(line).decode()


# The access record is made from a template rather than by `LogRecord.__init__` (the caller lookup,
# the path arithmetic, the process name): it is on every request. It is a complete LogRecord all
# the same, for filters and other handlers.
_TEMPLATE = vars(
    logging.LogRecord(access_log.name, logging.INFO, __file__, 0, "request", None, None, "log_access")
)
_START = logging._startTime / 1e9 if isinstance(logging._startTime, int) else logging._startTime  # type: ignore[attr-defined]


def log_access(fields: dict[str, Any]) -> None:
    """The per-request access line, `{"ts", "level", "logger", "msg": "request", **fields}`: a
    record handed to the logging machinery like any other, which queues it (see `LogWriter`)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    record = logging.LogRecord.__new__(logging.LogRecord)
    attrs = record.__dict__
    attrs.update(_TEMPLATE)
    attrs.update(fields)
    now = time.time()
    attrs["created"] = now
    attrs["msecs"] = (now - int(now)) * 1000
    attrs["relativeCreated"] = (now - _START) * 1000
    attrs["thread"] = threading.get_ident()
    attrs["process"] = os.getpid()
    access_log.handle(record)


class _Marker:
    """Put in the queue by `flush` (and `close`): set once the writer has written everything before it."""

    __slots__ = ("done", "stop")

    def __init__(self, stop: bool = False) -> None:
        self.done = threading.Event()
        self.stop = stop


class LogWriter(logging.Handler):
    """Queues each record (never blocking) for a writer thread that formats it and writes the line
    to the log file, if any, then stdout.

    The file is opened in append mode and written one batch of whole lines at a time: several
    worker processes share it. Before each batch the writer compares the file at `path` with the
    one it holds open (st_dev, st_ino, as `logging.handlers.WatchedFileHandler` does) and reopens
    it when it was moved or removed, so logrotate needs no signal and no copytruncate.
    """

    def __init__(self, path: Path | None, max_lines: int = MAX_QUEUED_LINES) -> None:
        super().__init__()
        self.path = path
        # Bound now, as `logging.StreamHandler` binds it: lines written late must not land in
        # whatever replaced sys.stdout meanwhile (pytest's capture is swapped in and out).
        self.stream = sys.stdout
        self.max_lines = max_lines
        self.dropped = 0  # lines dropped since the last warning about it
        self.dropped_total = 0
        self._drop_lock = threading.Lock()
        # Not the handler's own lock: `logging.shutdown` holds that one while it waits in `flush`.
        self._file_lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._writer_id: int | None = None
        self._late: _Marker | None = None  # the marker of a wait that timed out
        self._closed = False
        self._fd: int | None = None
        self._file_id: tuple[int, int] | None = None
        self._failing: set[str] = set()
        if path is not None:
            self._open_file()  # here, so that a LOG_FILE that cannot be opened stops start-up
        _writers.add(self)

    # -- the caller's side: any thread, the event loop above all -------------------------------

    def handle(self, record: logging.LogRecord) -> logging.LogRecord | bool:
        # No handler lock: `emit` only puts on a thread-safe queue.
        rv = self.filter(record)
        if rv:
            self.emit(rv if isinstance(rv, logging.LogRecord) else record)  # 3.12: a filter may swap it
        return rv

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._closed:  # after shutdown: written at once, as the stock handlers do
                self._write([self.format(record)])
                return
            # The writer's own warning about drops always goes in: it is written once there is room.
            if self._queue.qsize() >= self.max_lines and threading.get_ident() != self._writer_id:
                with self._drop_lock:
                    self.dropped += 1
                    self.dropped_total += 1
                return
            if record.args or record.exc_info:
                record = _frozen(record)
            if self._thread is None:
                self._start()
            self._queue.put(record)
        except Exception:
            self.handleError(record)

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait (up to `timeout` seconds) until every line queued so far is written."""
        return self._wait(_Marker(), timeout)

    def close(self) -> None:
        """Write what is queued (up to `FLUSH_TIMEOUT_S`), stop the thread, close the file."""
        if not self._closed:
            self._closed = True
            if self._wait(_Marker(stop=True), FLUSH_TIMEOUT_S) and self._thread is not None:
                self._thread.join(FLUSH_TIMEOUT_S)
        if self._thread is None or not self._thread.is_alive():
            with self._file_lock:
                self._close_file()
        super().close()

    def _wait(self, marker: _Marker, timeout: float) -> bool:
        thread = self._thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            return True
        late = self._late
        self._queue.put(marker)  # past the bound: it is not a line
        if late is not None and not late.done.is_set():
            return False  # an earlier wait timed out and the writer is still stuck: no second wait
        if marker.done.wait(timeout):
            return True
        self._late = marker
        return False

    def _start(self) -> None:
        with self._drop_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pwachat-log-writer", daemon=True)
                self._thread.start()

    def _after_fork(self) -> None:
        # In a forked worker: no writer thread (threads do not survive a fork), and the parent's
        # queued lines are the parent's to write.
        self._queue = queue.SimpleQueue()
        self._thread = self._writer_id = self._late = None
        self._drop_lock = threading.Lock()
        self._file_lock = threading.Lock()
        self.dropped = 0

    # -- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        self._writer_id = threading.get_ident()
        while True:
            try:
                if self._write_batch(self._queue):
                    return
            except Exception as err:  # the writer must outlive whatever one batch did
                self._failed("writer", err)

    def _write_batch(self, q: queue.SimpleQueue[Any]) -> bool:
        """Format and write what is queued (a batch at most); True when asked to stop."""
        batch = [q.get()]
        while len(batch) < BATCH_LINES:
            try:
                batch.append(q.get_nowait())
            except queue.Empty:
                break
        lines: list[str] = []
        markers: list[_Marker] = []
        for item in batch:
            if isinstance(item, _Marker):
                markers.append(item)
                continue
            try:
                lines.append(self.format(item))
            except Exception:
                self.handleError(item)
        if lines:
            self._write(lines)
        if self.dropped:
            with self._drop_lock:
                dropped, self.dropped = self.dropped, 0
            # Through the logging machinery like any line: now there is room for it.
            _log.warning(
                "log lines dropped: the log writer fell behind",
                extra={"event": "log_lines_dropped", "dropped": dropped},
            )
        for marker in markers:
            marker.done.set()
        return any(m.stop for m in markers)

    def _write(self, lines: list[str]) -> None:
        text = "\n".join(lines) + "\n"
        if self.path is not None:
            try:
                with self._file_lock:
                    self._reopen_if_moved()
                    view = memoryview(text.encode("utf-8", "backslashreplace"))
                    while view:
                        view = view[os.write(self._fd, view) :]  # type: ignore[arg-type]
                self._ok("LOG_FILE")
            except OSError as err:
                self._failed("LOG_FILE", err)
        stream = self.stream
        if stream is not None:
            try:
                # Blocks this thread while the reader of stdout is slow; the queue absorbs it.
                stream.write(text)
                stream.flush()
                self._ok("stdout")
            except (OSError, ValueError) as err:
                self._failed("stdout", err)

    def _open_file(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        st = os.fstat(fd)
        self._close_file()
        self._fd, self._file_id = fd, (st.st_dev, st.st_ino)

    def _reopen_if_moved(self) -> None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if self._fd is None or current != self._file_id:
            self._open_file()

    def _close_file(self) -> None:
        fd, self._fd, self._file_id = self._fd, None, None
        if fd is not None:
            os.close(fd)

    def _failed(self, sink: str, err: Exception) -> None:
        # Once per outage, on stderr: the log itself is what fails.
        if sink not in self._failing:
            self._failing.add(sink)
            with contextlib.suppress(Exception):  # nowhere left to say it
                print(f"pwachat: cannot write the log ({sink}): {err}", file=sys.__stderr__, flush=True)

    def _ok(self, sink: str) -> None:
        self._failing.discard(sink)


def _frozen(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of `record` with its message and trace rendered now: the writer formats it later, on
    another thread, when the arguments may have changed and the frames should be gone."""
    copy = logging.makeLogRecord(record.__dict__)
    copy.msg = record.getMessage()
    copy.args = None
    if record.exc_info:
        if not copy.exc_text and record.exc_info[1] is not None:
            copy.exc_text = "".join(traceback.format_exception(*record.exc_info))
        copy.exc_info = None
    return copy


_writers: weakref.WeakSet[LogWriter] = weakref.WeakSet()


def flush_logging(timeout: float = FLUSH_TIMEOUT_S) -> None:
    """Write every queued line of every `LogWriter` (each waits up to `timeout` seconds)."""
    for writer in list(_writers):
        writer.flush(timeout)


def _after_fork_in_child() -> None:
    for writer in list(_writers):
        writer._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
# Granian's workers are forked and end through multiprocessing, which runs threading's exit hooks
# but not `atexit` (so not `logging.shutdown` either); this hook runs in both cases.
(getattr(threading, "_register_atexit", None) or atexit.register)(flush_logging)


def setup_logging(settings: Settings) -> None:
    """Route every logger (ours, Litestar's, Granian's) to JSON lines; safe to call again.

    Raises OSError when `LOG_FILE` cannot be opened for appending."""
    handler = LogWriter(Path(settings.log_file) if settings.log_file else None)
    handler.setFormatter(JsonFormatter())
    handler._pwachat = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_pwachat", False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in ("litestar", "granian", "granian.access", "_granian"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
