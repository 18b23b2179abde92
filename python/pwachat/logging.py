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

__all__ = ["JsonFormatter", "TeeHandler", "access_log", "setup_logging"]

_encode = msgspec.json.Encoder(enc_hook=str).encode

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

access_log = logging.getLogger("pwachat.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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
            line = self.format(record) + "\n"
            sys.stdout.write(line)
            sys.stdout.flush()
            if self.file is not None:
                self.file.write(line)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()


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
    root.setLevel(settings.log_level)
    for name in ("litestar", "granian", "granian.access", "_granian"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
