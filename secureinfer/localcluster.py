"""A loopback cluster of real processes: certificates, dealer and parties.

Used by the demo, the integration tests and the benchmark. Every process is started the
way a user starts it — ``python -m secureinfer dealer|party --config FILE`` — with its
own throw-away certificates, and talks mTLS gRPC on free loopback ports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from secureinfer.certs import create_certificates
from secureinfer.config import Topology, load_topology, write_local_topology
from secureinfer.errors import PeerUnavailableError
from secureinfer.transport import tls
from secureinfer.v1 import common_pb2, party_pb2_grpc

__all__ = ["LocalCluster"]


class LocalCluster:
    """Dealer + ``n_parties`` parties as subprocesses under ``workdir``.

    >>> with LocalCluster(tmp_path) as cluster:
    ...     Client(cluster.config_path).infer(...)
    """

    def __init__(
        self, workdir: str | Path, *, n_parties: int = 2, log_to: str | Path | None = None,
        request_timeout_s: float = 30.0, rpc_timeout_s: float = 10.0, pool_size: int = 2,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "cluster.toml"
        if not self.config_path.exists():
            write_local_topology(
                self.config_path, base_dir=self.workdir, n_parties=n_parties, request_timeout_s=request_timeout_s,
                rpc_timeout_s=rpc_timeout_s, pool_size=pool_size,
            )
        self.topology: Topology = load_topology(self.config_path)
        if not Path(self.topology.cluster.ca_cert or "").exists():
            create_certificates(self.topology)
        self.log_dir = Path(log_to) if log_to else self.workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "secureinfer", *args, "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        log.close()

    def start(self, *, timeout: float = 60.0) -> "LocalCluster":
        self._spawn("dealer", ["dealer"])
        for p in self.topology.parties:
            self._spawn(f"party{p.id}", ["party", "--id", str(p.id)])
        self.wait_ready(timeout=timeout)
        return self

    def start_party(self, party_id: int, *, timeout: float = 60.0) -> None:
        self._spawn(f"party{party_id}", ["party", "--id", str(party_id)])
        self.wait_ready(timeout=timeout)

    def kill(self, name: str, *, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ readiness
    def wait_ready(self, *, timeout: float = 60.0, identity: str = "client") -> None:
        """Wait until every party says ServerReady (all peers and the dealer answer)."""
        ident = self.topology.identity(identity)
        st = self.topology.cluster
        deadline = time.monotonic() + timeout
        pending = list(self.topology.parties)
        while pending:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise PeerUnavailableError(f"{name} exited with {proc.returncode}:\n{tail}")
            p = pending[0]
            with tls.open_channel(p.address, settings=st, cert=ident.cert, key=ident.key) as ch:
                try:
                    r = party_pb2_grpc.InferenceStub(ch).ServerReady(common_pb2.ServerReadyRequest(), timeout=2.0)
                    if r.ready:
                        pending.pop(0)
                        continue
                except grpc.RpcError:
                    pass
            if time.monotonic() > deadline:
                raise PeerUnavailableError(f"cluster not ready after {timeout:.0f}s (waiting for party {p.id})")
            time.sleep(0.2)

    def log_text(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")
