"""Real Redis servers on loopback for the shared-tier tests and ``bench/remote.py``.

:class:`RedisServer` runs one ``redis-server`` process (no persistence, its files in a
directory of its own) on a free port and can be killed and restarted on the same port;
:class:`RedisCluster` runs several of them as a Redis Cluster of masters. Every wait is
bounded: a server that does not come up raises :class:`LaunchError` with its log.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LaunchError", "RedisCluster", "RedisServer", "TLSFiles", "free_port", "missing"]


class LaunchError(RuntimeError):
    """A server or cluster did not start."""


def missing() -> str:
    """Why the shared-tier tests cannot run here ("" when they can)."""
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError as exc:
        return f"the redis package is not installed ({exc})"
    return ""


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, cluster_bus: bool = False) -> int:
    """A loopback port nobody listens on (``redis-server --port 0`` means no TCP at all); with
    ``cluster_bus`` also port + 10000, the cluster bus port."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not cluster_bus or (port + 10000 <= 65535 and _bindable(port + 10000)):
            return port
    raise LaunchError("no free port pair for a cluster node")


@dataclass(frozen=True)
class TLSFiles:
    """A self-signed certificate for 127.0.0.1 (also its own CA) and its key."""

    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> TLSFiles:
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / "cert.pem", directory / "key.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return cls(cert, key)


class RedisServer:
    """One ``redis-server`` on 127.0.0.1.

    Args:
        directory: its working directory and log (created).
        args: more ``redis-server`` options, e.g. ``["--requirepass", "pw"]``.
        tls: serve TLS only, with this certificate.
        cluster: a cluster node (needs ``port + 10000`` free as well).
    """

    def __init__(
        self,
        directory: Path,
        args: Sequence[str] = (),
        *,
        tls: TLSFiles | None = None,
        cluster: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port(cluster_bus=cluster)
        self.args = list(args)
        self.tls = tls
        self.cluster = cluster
        self.log = self.directory / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        cmd += ["--dir", str(self.directory), "--logfile", str(self.log)]
        cmd += ["--enable-debug-command", "local"]  # DEBUG SLEEP stalls it in the fault tests
        if self.tls is None:
            cmd += ["--port", str(self.port)]
        else:
            cmd += ["--port", "0", "--tls-port", str(self.port)]
            cmd += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            cmd += ["--tls-ca-cert-file", str(self.tls.cert), "--tls-auth-clients", "no"]
        if self.cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"]
            cmd += ["--cluster-config-file", str(self.directory / "nodes.conf")]
            cmd += ["--cluster-require-full-coverage", "no"]
        return cmd + self.args

    def start(self, timeout: float = 15.0) -> RedisServer:
        """Start (again, on the same port) and wait until it accepts connections."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.directory / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.directory / "stderr.log").read_text(errors="replace")
                raise LaunchError(
                    f"redis-server exited ({self.proc.returncode}): {err}{self._log(offset)}"
                )
            if "Ready to accept connections" in self._log(offset):
                return self
            time.sleep(0.01)
        self.stop()
        raise LaunchError(f"redis-server not ready within {timeout} s: {self._log(offset)}")

    def _log(self, offset: int) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: the server vanishes with everything it held."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def client(self, **kwargs: Any) -> Any:
        """An administrative redis-py client (a plain one, short timeouts)."""
        import redis

        options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5}
        if self.tls is not None:
            options.update(ssl=True, ssl_ca_certs=str(self.tls.cert))
        return redis.Redis(host="127.0.0.1", port=self.port, **{**options, **kwargs})


class RedisCluster:
    """``masters`` cluster nodes (no replicas) joined by ``redis-cli --cluster create``."""

    def __init__(self, directory: Path, masters: int = 3, args: Sequence[str] = ()) -> None:
        self.nodes = [
            RedisServer(Path(directory) / f"node{i}", args, cluster=True) for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 60.0) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
            subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            self._wait_ok(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, deadline: float) -> None:
        clients = [n.client() for n in self.nodes]
        try:
            while time.monotonic() < deadline:
                infos = [c.cluster("info") for c in clients]
                if all(
                    i["cluster_state"] == "ok"
                    and int(i["cluster_slots_assigned"]) == 16384
                    and int(i["cluster_known_nodes"]) == len(self.nodes)
                    for i in infos
                ):
                    return
                time.sleep(0.05)
        finally:
            for c in clients:
                c.close()
        raise LaunchError("the cluster did not reach cluster_state:ok")

    def node_of(self, key: bytes) -> RedisServer:
        """The node that serves ``key``'s slot (by asking the first live node)."""
        import redis

        slot = redis.cluster.key_slot(key)
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            with node.client() as c:
                for start, end, master, *_ in c.execute_command("CLUSTER SLOTS"):
                    if start <= slot <= end:
                        port = int(master[1])
                        return next(n for n in self.nodes if n.port == port)
        raise LaunchError(f"no node serves slot {slot}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
