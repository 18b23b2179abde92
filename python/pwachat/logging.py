"""JSON log lines to stdout and `LOG_FILE`.

One line per request (request id, method, path, status, duration and what the route added, such as
provider, model and sizes), never chat text, tokens or keys: the routes only ever add counts and
names to a request's log fields.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import msgspec

from pwachat.settings import Settings

__all__ = ["JsonFormatter", "TeeHandler", "access_log", "log_access", "setup_logging"]

_encode = msgspec.json.Encoder(enc_hook=str).encode

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

access_log = logging.getLogger("pwachat.access")


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _timestamp(created: float, msecs: float) -> str:
    second = int(created)
    if _second[0] != second:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second[1]}.{int(msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created, record.msecs),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            line["trace"] = "".join(traceback.format_exception(*record.exc_info))
        return _encode(line).decode()


class TeeHandler(logging.Handler):
    """Formats each record once and writes the line to stdout and, if set, the log file.

    (Two stock handlers would format every line twice: the access line is on every request.)
    The file is opened in append mode: several worker processes share it, one write per line.
    """

    def __init__(self, path: Path | None) -> None:
        super().__init__()
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record) + "\n")
        except Exception:
            self.handleError(record)

    def write_line(self, line: str) -> None:
        sys.stdout.write(line)
        sys.stdout.flush()
        if self.file is not None:
            self.file.write(line)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()


#: The root logger's handlers when they are exactly the ones `setup_logging` installed: then the
#: access line can skip the logging machinery (see `log_access`).
_ours: list[logging.Handler] = []


def log_access(fields: dict[str, Any]) -> None:
    """The per-request access line, `{"ts", "level", "logger", "msg", **fields}`.

    When nothing but our own handler listens (the server as run), the line is written straight to
    it: the same JSON a `LogRecord` would become, without the record, the caller lookup and the
    handler chain, which cost about an eighth of the Python time of a whole /api/chat request
    (py-spy). Anything else (another handler, a filter, as under pytest) gets a real record."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    handlers = logging.root.handlers
    if not _ours or handlers != _ours or access_log.handlers or access_log.filters:
        access_log.info("request", extra=fields)
        return
    now = time.time()
    head = {"ts": _timestamp(now, (now - int(now)) * 1000), "level": "INFO", "logger": access_log.name}
    line = _encode({**head, "msg": "request", **fields}).decode() + "\n"
    try:
        for handler in handlers:
            handler.write_line(line)  # type: ignore[attr-defined]
    except Exception:
        access_log.info("request", extra=fields)  # the handler reports its own failure


def setup_logging(settings: Settings) -> None:
    """Route every logger (ours, Litestar's, Granian's) to JSON lines; safe to call again."""
    formatter = JsonFormatter()
    handlers: list[logging.Handler] = [TeeHandler(Path(settings.log_file) if settings.log_file else None)]
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_pwachat", False):
            root.removeHandler(old)
            old.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._pwachat = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    _ours[:] = list(root.handlers) if root.handlers == handlers else []
    root.setLevel(settings.log_level)
    for name in ("litestar", "granian", "granian.access", "_granian"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
