"""`pwachat serve`: validate the configuration once, then run Granian with the Litestar app."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import math
import os
import shutil
import sys
import tempfile

from pwachat.settings import ConfigError, Settings

__all__ = ["KILL_MARGIN_S", "main"]

#: How much longer than SHUTDOWN_GRACE_S Granian waits for a worker on SIGTERM before it kills it:
#: time for the streams ended at the grace's end to send their last event and for the worker to
#: exit. A container's stop timeout (compose's `stop_grace_period`) must exceed the sum.
KILL_MARGIN_S = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pwachat", description="The backend a chat PWA talks to.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the API with Granian")
    serve.add_argument("--host", help="listen address (default: HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: PORT or 5000)")
    serve.add_argument("--workers", type=int, help="worker processes (default: WORKERS or 1)")
    serve.add_argument(
        "--max-concurrency",
        type=int,
        help="requests one worker serves at once, held streams included (default: MAX_CONCURRENCY or 4096)",
    )
    serve.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as err:
        print(f"pwachat: configuration error: {err}", file=sys.stderr)
        return 2
    return serve(settings, args)


def serve(settings: Settings, args: argparse.Namespace) -> int:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces

    from pwachat.logging import setup_logging

    try:
        setup_logging(settings)
    except OSError as err:
        # The path is no secret, but the reason is what helps: "Permission denied", "Not a directory".
        print(
            f"pwachat: configuration error: LOG_FILE: cannot open it for appending ({err.strerror})",
            file=sys.stderr,
        )
        return 2
    from pwachat import sdk_config

    try:
        handoff = sdk_config.config_for_workers(settings)
    except ConfigError as err:
        print(f"pwachat: configuration error: {err}", file=sys.stderr)
        return 2
    if handoff:
        os.environ[sdk_config.ENV_VAR] = handoff  # inherited by the workers Granian starts
    with contextlib.suppress(OSError):  # no writable TMPDIR: each worker counts on its own
        # The instance's metrics directory: each worker's file in it, summed by GET /metrics
        # (pwachat/metrics.py); kept until this process exits, so a restarted worker's counts stay.
        metrics_dir = tempfile.mkdtemp(prefix=f"pwachat-metrics-{os.getpid()}-")
        atexit.register(shutil.rmtree, metrics_dir, True)
        os.environ["PWACHAT_METRICS_DIR"] = metrics_dir
    host = args.host or settings.host
    port = args.port or settings.port
    workers = args.workers or settings.workers
    concurrency = args.max_concurrency or settings.max_concurrency
    if port < 1 or port > 65535 or workers < 1 or concurrency < 1:
        print("pwachat: --port must be 1..65535, --workers and --max-concurrency >= 1", file=sys.stderr)
        return 2
    Granian(
        "pwachat.app:create_app_from_env",
        factory=True,
        interface=Interfaces.ASGI,
        # HTTP/1.1 only: browsers speak HTTP/2 only over TLS, which the proxy in front terminates,
        # and Granian's HTTP/2 readiness costs ~10 KB per open connection (1,000 streams: 10 MB).
        http=HTTPModes.http1,
        address=host,
        port=port,
        workers=workers,
        # Granian serves at most `backpressure` requests per worker at once (its default, the
        # backlog, would cap a worker at 1,024 held streams); the listen backlog, shared by the
        # workers, holds what waits beyond that (the kernel caps it at net.core.somaxconn).
        backpressure=concurrency,
        backlog=min(max(1024, concurrency * workers), 65535),
        reload=args.reload,
        # On SIGTERM Granian stops accepting and waits for every running request, by default for
        # ever; the drain (pwachat/drain.py) ends the streams at SHUTDOWN_GRACE_S, and this bounds
        # what is left (a non-stream chat still waiting for its provider) just after that.
        workers_kill_timeout=math.ceil(settings.shutdown_grace_s) + KILL_MARGIN_S,
        log_access=False,
        log_level=settings.log_level.lower(),
        # Granian's own lines (start-up, worker spawns) as JSON too, like everything else on stdout.
        log_dictconfig={
            "formatters": {
                "generic": {"()": "pwachat.logging.JsonFormatter"},
                "access": {"()": "pwachat.logging.JsonFormatter"},
            }
        },
        websockets=False,
    ).serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
