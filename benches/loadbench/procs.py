"""The processes under load: the fake upstream, the pacer and the real `pwachat serve`, each pinned to
its core."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from server import clean_env, free_port  # noqa: E402

SERVER_CORE, LOAD_CORE = "0", "1"
# benches/pacer (built by the Makefile's bench targets: cargo build --release --manifest-path ...).
PACER = ROOT / "benches" / "pacer" / "target" / "release" / "pacer"
OPENAI_KEY = "sk-test-openai"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Enough for the held scenario's 5,000 streams on one worker (Granian's backpressure and backlog).
MAX_CONCURRENCY = 8192


def pinned(core: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", core, *argv]


def raise_fd_limit() -> None:
    """Soft fd limit up to the hard one, for this process and the processes it starts (5,000 held
    streams are 10,000 sockets in the server: the reader's and the upstream's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` (/proc/PID/stat utime and stime)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def status_kb(pids: list[int], field: str) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
    return total


class TlsFiles:
    """A throwaway CA (trustme) and a certificate for 127.0.0.1 and localhost, as PEM files in `tmp`."""

    def __init__(self, tmp: Path) -> None:
        import trustme

        ca = trustme.CA()
        self.ca_file = tmp / "ca.pem"
        self.cert_file = tmp / "fake.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
            str(self.cert_file)
        )


class Fake:
    """tests/fake_upstream.py in its own process, driven over its control API (plain HTTP; with
    `tls`, the same app on a second, TLS port too: `tls_url`)."""

    def __init__(self, tmp: Path, tls: TlsFiles | None = None) -> None:
        argv = [sys.executable, str(ROOT / "tests" / "fake_upstream.py"), "--port", "0"]
        if tls is not None:
            argv += ["--tls-cert", str(tls.cert_file)]
        # asyncio logs every TLS connection a client drops at the end of a wrk run: not for the table.
        with open(tmp / "fake.err", "wb") as err:
            self.proc = subprocess.Popen(
                pinned(LOAD_CORE, argv), stdout=subprocess.PIPE, stderr=err, text=True
            )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"fake upstream did not start: {line!r}")
        self.url = line.split()[1]
        self.tls_url = ""
        if tls is not None:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if not line.startswith("LISTENING_TLS "):
                raise RuntimeError(f"fake upstream did not serve TLS: {line!r}")
            self.tls_url = line.split()[1]
        self.port = int(self.url.rsplit(":", 1)[1])

    def control(self, path: str, payload: object = None) -> object:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def behave(self, **params: object) -> None:
        self.control("/_control/reset", {})
        self.control("/_control/behaviour", {"provider": "openai", **params})

    def requests(self) -> list[dict]:
        return self.control("/_control/requests?provider=openai")  # type: ignore[return-value]

    def cpu_seconds(self) -> float:
        return cpu_seconds([self.proc.pid])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Pacer:
    """benches/pacer in its own process on the load core: the paced upstream (`url`, `port`) and, in
    the same process and runtime, the load client, driven one `load` command a line on its stdin
    (each answered by one JSON line of figures: benches/pacer/README.md). With `processes=2` each
    load runs instead as a `pacer load` process of its own, pinned to `client_core` (by default
    the load core too: on a machine with a third core, give the client that one)."""

    def __init__(self, processes: int = 1, client_core: str = LOAD_CORE) -> None:
        if not PACER.exists():
            raise RuntimeError(
                f"{PACER} is missing: cargo build --release --manifest-path benches/pacer/Cargo.toml"
            )
        self.processes = processes
        self.client_core = client_core
        self.proc = subprocess.Popen(
            pinned(LOAD_CORE, [str(PACER), "serve"]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"the pacer did not start: {line!r}")
        self.url = line.split()[1]
        self.port = int(self.url.rsplit(":", 1)[1])

    def load(self, port: int, api: str, streams: int, period: float, tokens: int, timeout: float) -> dict:
        """`streams` paced streams at once to 127.0.0.1:`port` (`api` "pwachat": POST /api/chat/stream,
        "openai": the pacer's own upstream): the client's figures, plus `pacer_cpu_s`, the CPU time
        of every pacer process during the run (the upstream's and the client's)."""
        args = [
            *("--target", f"127.0.0.1:{port}", "--api", api, "--streams", str(streams)),
            *("--period-ms", f"{period * 1000:g}", "--tokens", str(tokens)),
            *("--timeout-s", f"{timeout:g}", "--key", OPENAI_KEY),
        ]
        cpu0, children0 = self.cpu_seconds(), os.times()
        if self.processes == 2:
            argv = pinned(self.client_core, [str(PACER), "load", *args])
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, check=True)
            line = out.stdout.strip().splitlines()[-1]
        else:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write("load " + " ".join(args) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        children1 = os.times()
        result = json.loads(line)
        if "error" in result:
            raise RuntimeError(f"pacer: {result['error']}")
        client = (children1.children_user - children0.children_user) + (
            children1.children_system - children0.children_system
        )
        result["pacer_cpu_s"] = self.cpu_seconds() - cpu0 + client
        return result

    def cpu_seconds(self) -> float:
        """The serving pacer's CPU time (the upstream, and the client when it runs in the same process)."""
        return cpu_seconds([self.proc.pid])

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # the end of its commands: it exits
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Server:
    """`pwachat serve`, one worker pinned to SERVER_CORE, the OpenAI provider at `base_url`, request
    limits of 10^9 and token budgets off; `env` adds to or overrides its environment."""

    def __init__(
        self, base_url: str, tmp: Path, ca_file: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        settings = {
            "PORT": str(self.port),
            "WORKERS": "1",
            "OPENAI_API_KEY": OPENAI_KEY,
            "OPENAI_BASE_URL": base_url,
            "RATELIMIT_PER_MINUTE": "1000000000",
            "RATELIMIT_PER_HOUR": "1000000000",
            "RATELIMIT_PER_DAY": "1000000000",
            # Token budgets off: wrk sends from one address, a single caller that the default
            # per-caller budget would refuse within seconds. The budget scenario turns them on.
            "TOKENS_PER_DAY": "0",
            "TOKENS_GLOBAL_PER_DAY": "0",
            "UPSTREAM_MAX_RETRIES": "0",
            "MAX_CONCURRENCY": str(MAX_CONCURRENCY),
            "LOG_FILE": str(tmp / f"load-{self.port}.log"),
        }
        if ca_file is not None:
            settings["SSL_CERT_FILE"] = str(ca_file)
        settings.update(env or {})  # `env` overrides any of these
        env = clean_env(**settings)
        self.proc = subprocess.Popen(
            pinned(SERVER_CORE, [sys.executable, "-m", "pwachat.cli", "serve"]),
            cwd=tmp,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.url + "/api/health/live", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("server did not start") from None
                time.sleep(0.05)
        self._pids = self._find_pids()

    def _find_pids(self) -> list[int]:
        out = [self.proc.pid]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(stat.parent.name))
        return out

    def pids(self) -> list[int]:
        """The Granian main process and its worker (found once: the worker stays)."""
        return self._pids

    def rss_mb(self) -> float:
        return status_kb(self._pids, "VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        """The peak resident memory of each process since it started (VmHWM), summed."""
        return status_kb(self._pids, "VmHWM") / 1024

    def cpu_seconds(self) -> float:
        return cpu_seconds(self._pids)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # a worker still draining its connections


@contextlib.contextmanager
def server(base_url: str, tmp: Path, ca_file: Path | None = None, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    srv = Server(base_url, tmp, ca_file, env)
    try:
        yield srv
    finally:
        srv.stop()


def tls_client_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))
