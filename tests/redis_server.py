"""A real `redis-server` process on a free loopback port, that tests can kill and start again."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from server import free_port


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *args: str) -> RedisServer:
        """Start it (again), with `args` added to its command line (`"--replicaof", host, port`, say)."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/run does)")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *args],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                if self.command("PING") == "PONG":
                    return self
            except OSError:
                pass
            time.sleep(0.02)  # polling for readiness with a deadline
        raise RuntimeError("redis-server did not answer PING")

    def kill(self) -> None:
        """Gone at once, as in a crash (SIGKILL): no goodbye to connected clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test left it paused
        self.kill()

    def pause(self) -> None:
        """Hung, not gone (SIGSTOP): connections stay open and commands get no answer."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def command(self, *args: str) -> object:
        """Send one command over a fresh connection, return the decoded reply (str, int or list)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
            sock.sendall(payload.encode())
            return _read_reply(sock.makefile("rb"))

    def evalsha_calls(self) -> int:
        """How many EVALSHA commands the server has run (INFO commandstats)."""
        info = str(self.command("INFO", "commandstats"))
        for line in info.splitlines():
            if line.startswith("cmdstat_evalsha:"):
                return int(line.split("calls=")[1].split(",")[0])
        return 0


def _read_reply(f) -> object:
    line = f.readline()
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        return data.decode()
    if kind == b"*":
        n = int(rest)
        return [_read_reply(f) for _ in range(max(n, 0))]
    raise RuntimeError(f"unexpected reply {line!r}")


class RedisCluster:
    """Three (or `size`) real `redis-server` masters on loopback, joined into one Redis Cluster
    (`redis-cli --cluster create`, no replicas), ready once every node says `cluster_state:ok`."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.nodes = [RedisServer(workdir) for _ in range(size)]
        # The cluster bus port is the node's port + 10000 unless given: past 55535 that is no port.
        self.bus_ports = {n.port: free_port() for n in self.nodes}

    @property
    def url(self) -> str:
        """The limiter's URL: every master a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{n.port}" for n in self.nodes]

    def start(self) -> RedisCluster:
        for node in self.nodes:
            self.restart(node)
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed (apt-get install redis-tools)")
        subprocess.run(
            [cli, "--cluster", "create", *self.addresses(), "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        while not all("cluster_state:ok" in str(n.command("CLUSTER", "INFO")) for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)  # polling for readiness with a deadline
        return self

    def restart(self, node: RedisServer) -> None:
        """Start a killed node again on its port: it rejoins with the slots its nodes file names
        (and none of its data: no persistence)."""
        conf = str(self.workdir / f"nodes-{node.port}.conf")
        bus = str(self.bus_ports[node.port])
        node.start("--cluster-enabled", "yes", "--cluster-config-file", conf, "--cluster-port", bus)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def node_of(self, key: str) -> RedisServer:
        """The master that serves `key`'s slot (CLUSTER KEYSLOT, then each node's own slot ranges)."""
        slot = int(self.nodes[0].command("CLUSTER", "KEYSLOT", key))  # type: ignore[arg-type]
        for node in self.nodes:
            for start, end, master, *_ in node.command("CLUSTER", "SLOTS"):  # type: ignore[union-attr]
                if start <= slot <= end and int(master[1]) == node.port:
                    return node
        raise RuntimeError("no master serves that slot")

    def keys(self, pattern: str) -> dict[int, list[str]]:
        """Every node's keys matching `pattern`, by port."""
        return {n.port: list(n.command("KEYS", pattern)) for n in self.nodes}  # type: ignore[arg-type]
