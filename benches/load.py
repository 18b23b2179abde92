"""The relay under load: the real `pwachat serve` against the fake upstream, one table and a JSON result.

    python benches/load.py            # or: make bench-load (make bench runs it after the micro benches)
    python benches/load.py --quick    # the subset make bench-compare / bench-baseline run

Layout: one server worker pinned to core 0; the load generators and the upstreams pinned to core 1:
for chat, stream, tls and latency, wrk (or this script's asyncio client) and the Python fake upstream
(tests/fake_upstream.py, its own process); for concurrent, paced and held, the pacer (benches/pacer, a
native binary: the paced upstream and the streaming load client in one current_thread runtime, one
process). Each scenario measures its upstream directly too, in the same run, where that means
something, and every figure with such a reference carries its ratio to it (benches/compare.py
compares those ratios):

- chat:        POST /api/chat (OpenAI provider, non-streamed), requests/s (wrk, 64 connections,
               --seconds each), and the server's CPU time per request (reference: the fake's own)
- stream:      POST /api/chat/stream with 20-chunk answers, relayed events/s, CPU per event
- tls:         chat and stream through a second server whose provider is the fake's TLS port (a
               trustme throwaway CA, SSL_CERT_FILE, https://127.0.0.1:PORT/v1), as ratios to plain
- concurrent:  --streams streams at once, a chunk every 250 ms, 24 each (6 s): relay lateness
               (arrival at the client minus the pacer's scheduled send time, which each token's
               text carries) p50/p99/max, first-byte time, peak resident memory of a fresh server
- redis:       chat and stream with the request limits in a real redis-server (REDIS_URL, on the
               load core), as ratios to the memory:// figures of the same run (features on vs off)
- latency:     100 requests/s, p50 latency through the server and to the fake directly, in
               alternating one-second blocks; back to back; the liveness probe against a no-op app
- paced:       real-paced streams, a token every 33 ms, 120 each (4 s), at 1,000 / 2,000 / 4,000 at
               once on one worker: the concurrent figures, plus the same straight to the pacer
- held:        held streams, a chunk every 250 ms, 24 each (6 s), at 1,000 / 5,000 at once: the same
- resume:      resumable streams on (default STREAM_GRACE_S) against STREAM_GRACE_S=0, as ratios on/off:
               stream events/s and CPU per event with memory:// and with Redis (and Redis on against
               memory:// off), 1,000 paced streams' lateness, 1,000 held streams' peak memory
- budget:      token budgets on (TOKENS_PER_DAY=10^12, TOKENS_GLOBAL_PER_DAY=10^15) against off
               (TOKENS_PER_DAY=0), as ratios on/off: chat req/s and stream events/s and the server's
               CPU per request or event with memory://; with Redis, what Redis adds to the server's CPU
               per chat request (Redis minus memory://, same budgets), on against off; 3 rounds, each
               on four fresh servers up together, wrk in interleaved blocks (A B C D D C B A)

Bounds: every stream level and wrk run has a deadline; all traffic goes to 127.0.0.1. The default
run takes about 9.5 minutes on the 2-core development machine (resume about 1.5 of them, budget
about 3), --quick about 1. The server runs with MAX_CONCURRENCY=8192, the soft fd limit raised to
the hard one and, but in the budget scenario, the token budgets off (wrk is a single caller).
This script measures; it asserts nothing. Needs `wrk` (Debian package), redis-server for redis,
resume and budget, Linux (taskset, /proc) and the pacer built
(`cargo build --release --manifest-path benches/pacer/Cargo.toml`: the Makefile's bench targets do).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from loadbench.procs import LOAD_CORE, PACER, ROOT, Fake, Pacer, TlsFiles, raise_fd_limit, server
from loadbench.results import Results
from loadbench.scenarios import Run, budget, latency, redis_limits, resume, streams_level, throughput

ALL = "chat,stream,tls,redis,concurrent,latency,paced,held,resume,budget"
QUICK = {"only": "chat,stream,tls,paced", "seconds": 4, "paced_levels": "1000"}


def _levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8, help="duration of each wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams in `concurrent`")
    parser.add_argument("--paced-levels", default="1000,2000,4000")
    parser.add_argument("--paced-tokens", type=int, default=120)
    parser.add_argument("--held-levels", default="1000,5000")
    parser.add_argument("--held-chunks", type=int, default=24)
    parser.add_argument(
        "--pacer-processes",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: the pacer's upstream and client in one process; 2: each load its own process",
    )
    parser.add_argument(
        "--pacer-client-core",
        default=LOAD_CORE,
        help="with --pacer-processes 2, the core of the load process (default: the load core)",
    )
    parser.add_argument("--only", default=ALL, help=f"comma-separated scenarios (default: {ALL})")
    parser.add_argument("--quick", action="store_true", help=f"the compare subset: {QUICK}")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benches" / "results" / "last.json", help="where the result goes"
    )
    args = parser.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    only = set(args.only.split(","))
    if unknown := only - set(ALL.split(",")):
        parser.error(f"unknown scenarios {sorted(unknown)} (known: {ALL})")
    if only & {"chat", "stream", "tls", "redis", "resume", "budget"} and shutil.which("wrk") is None:
        print("benches/load.py needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    paced = only & {"concurrent", "paced", "held", "resume"}
    if paced and not PACER.exists():
        print(
            f"benches/load.py needs the pacer for {sorted(paced)}: "
            "cargo build --release --manifest-path benches/pacer/Cargo.toml",
            file=sys.stderr,
        )
        return 2
    # This script is the load generator of the latency scenario (and waits on the pacer for the
    # others): it belongs on the load core with wrk, the fake and the pacer, not on the server's.
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    raise_fd_limit()
    settings = {
        k: getattr(args, k)
        for k in (
            "seconds",
            "connections",
            "streams",
            "paced_levels",
            "paced_tokens",
            "held_levels",
            "held_chunks",
        )
    }
    settings["only"] = ",".join(s for s in ALL.split(",") if s in only)
    if args.pacer_processes != 1:  # (settings only when not the default: older results lack them)
        settings["pacer_processes"] = args.pacer_processes
        settings["pacer_client_core"] = args.pacer_client_core
    results = Results(settings)
    tmp = Path(tempfile.mkdtemp(prefix="pwachat-load-"))
    started = time.monotonic()
    tls = fake = pacer = None
    try:
        if only & {"chat", "stream", "tls", "redis", "latency", "resume", "budget"}:
            tls = TlsFiles(tmp)
            fake = Fake(tmp, tls)
        pacer = Pacer(args.pacer_processes, args.pacer_client_core) if paced else None
        run = Run(fake, tls, pacer, tmp, results, args.seconds, args.connections, only)
        if fake is not None and only & {"chat", "stream", "tls", "redis", "latency"}:
            with server(fake.url + "/v1", tmp) as plain:
                run.plain = plain
                for kind in ("chat", "stream"):
                    if only & {kind, "tls", "redis"}:
                        throughput(run, kind)
                if "redis" in only:
                    redis_limits(run)
                if "latency" in only:
                    latency(run)
            run.plain = None
        if "concurrent" in only:
            streams_level(run, "concurrent", args.streams, 0.25, 24, direct=False)
        if "paced" in only:
            for n in _levels(args.paced_levels):
                streams_level(run, "paced", n, 0.033, args.paced_tokens, direct=True)
        if "held" in only:
            for n in _levels(args.held_levels):
                streams_level(run, "held", n, 0.25, args.held_chunks, direct=True)
        if "resume" in only:  # its own servers, after the plain one has gone
            resume(run, args.paced_tokens, args.held_chunks)
        if "budget" in only:  # its own servers too
            budget(run)
    finally:
        if fake is not None:
            fake.stop()
        if pacer is not None:
            pacer.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    results.write(args.json)
    print()
    print(results.table())
    print(f"\n{time.monotonic() - started:.0f} s; result: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
