"""WAN benchmark: every process in its own network namespace, links with delay and a rate limit.

The script builds, as root, one Linux network namespace per host -- the dealer, each
compute party and the client -- each with its own IPv4 address, joins them, shapes the
parties' access links, and runs the real processes inside, started the way a user starts
them::

    ip netns exec <prefix>-d  python -m secureinfer dealer --config FILE
    ip netns exec <prefix>-pN python -m secureinfer party --id N --config FILE
    ip netns exec <prefix>-c  python scripts/bench_wan_driver.py serve --config FILE

The topology file is written by :func:`secureinfer.config.write_local_topology` (so it
picks up every field that function writes, e.g. a party's ``data_address``) with fixed
ports, after which each address is moved to its host's IP; the certificates come from
:func:`secureinfer.certs.create_certificates`, which names each process's own address in
its certificate (SAN). Ports: dealer 50050, party ``i`` ``50100 + 10 i`` with
``50101 + 10 i`` (port + 1) left to its data path.

Network (``--backend``):

* ``netem`` -- veth pairs on a bridge in the root namespace; each party's veth gets
  ``tc qdisc ... netem delay D rate B`` on BOTH ends (its egress inside the namespace and
  the bridge side's egress towards it). A packet between two parties crosses four such
  qdiscs per round trip, so ``RTT = 4 D``; a packet between a party and the client or the
  dealer (whose veths are not shaped) crosses two, so that RTT is ``RTT/2``.
* ``tun`` -- for kernels without ``sch_netem`` (like the development VM's, built without
  ``CONFIG_NET_SCH_NETEM``): one TUN device per namespace, joined by the user-space switch
  ``scripts/wan_relay.py``, which emulates exactly the netem model above (each party's
  access link: uplink and downlink FIFOs, rate ``B``, one-way delay ``D`` each). The relay
  runs under ``SCHED_FIFO`` (``--relay-rt-priority``; netem's timers run in softirq
  context, ahead of every process): under normal scheduling on the shared 2 cores its
  wake-ups came up to 55 ms late. Each row reports how late its events ran
  (``relay_max_late_ms``, ``relay_events_late_over_1ms`` of ``relay_events``).
* ``auto`` (default) -- ``netem`` when the kernel has it, else ``tun``.

Delays are calibrated: the unshaped RTT between party 0 and party 1 is measured first
(ICMP echo from party 0's namespace, ``bench_wan_driver.py ping``), and ``D = (target RTT
- that RTT) / 4``, with one correction step if the shaped RTT still misses the target by
more than 1% (both on the minimum of 20 echoes: queueing only adds to it), so the
measured party-to-party RTT matches the target; each setting's measured RTT (median and
minimum) is printed and reported. TCP in the namespaces runs
with ``net.ipv4.tcp_slow_start_after_idle = 0`` unless ``--slow-start-after-idle``: the
benchmark spaces its requests by more than an RTO, after which the kernel default would
restart every connection from a 10-segment window (reported as
``tcp_slow_start_after_idle``).

Measurement, per case (``--cases``, builders from ``scripts/bench.py``'s ``CASES``): the
model is deployed once over the unshaped network, then for each setting -- first the
baseline (no delay, no rate limit: the compute and framework cost), then every
(RTT, bandwidth) pair -- the links are reshaped, ``--warmup`` requests run back to back,
and ``--repeat`` requests are measured, each started only after the dealer's counters have
been still for ``0.3 s + 2 x (one party's dealer bytes) / bandwidth + 4 RTT`` (the
dealer counts a prefetched part when it hands it out, before the part crosses the
emulated link; waiting for its transfer keeps refills off the measured requests).

Output: one JSON line per (case, setting) on stdout, a table on stderr::

    {"case", "backend", "n_parties", "rtt_ms", "rtt_measured_ms", "rtt_measured_min_ms",
     "client_rtt_ms", "bandwidth_mbit", "requests", "latency_ms_median", "latency_ms_p90",
     "party_ms_median", "rounds", "bytes_online", "bytes_per_party", "bytes_offline",
     "bytes_client_up", "lower_bound_ms", "ratio", "lower_bound_oneway_ms", "ratio_oneway",
     "baseline_ms_median", "lower_bound_plus_compute_ms", "ratio_plus_compute",
     "argmax_agreement", "max_abs_error", "tcp_slow_start_after_idle", "delay_per_qdisc_ms",
     "settle_s", "seconds", "dealer_counters", ["relay_max_late_ms",
     "relay_events_late_over_1ms", "relay_events", "wire_bytes_per_request"]}

(``rtt_ms`` 0 and ``bandwidth_mbit`` null: the baseline row.) ``dealer_counters``: how the
dealer's counters moved over the measured requests (``binds_prefetched`` /
``binds_fallback``...); the gauges ``generating``, ``pooled_sets``, ``pooled_bytes``,
``claimed_sets`` are their values at the end. Bracketed fields: tun backend only; ``wire_bytes_per_request`` is
the median over the requests of the bytes on the wire (headers included) per host pair
``"src>dst"`` (``d`` dealer, ``c`` client, ``pN`` parties) between just before and just
after each request, read from the relay: ``p0>p1`` checks the ``bytes_per_party`` term
of the bound, and ``d>pN`` shows dealer traffic that shares the request's links.

The lower bound. ``bytes_online`` (the client's ``InferenceCost``) is the party-to-party
payload of one request summed over the sending parties; ``bytes_per_party =
bytes_online / n_parties`` is what one party sends per request -- with two parties, what
it sends to its one peer. All of it crosses that party's own rate-limited access link
(and the peer's), which is the bottleneck, while the other party's bytes cross the other
direction at the same time; so the transfer needs at least ``bytes_per_party x 8 / B``::

    lower_bound_ms = rounds x RTT + bytes_per_party x 8 / B
    lower_bound_plus_compute_ms = lower_bound_ms + baseline_ms_median
    ratio = latency_ms_median / lower_bound_ms

with ``RTT`` the target RTT and ``B`` the bandwidth. ``lower_bound_oneway_ms`` replaces
``rounds x RTT`` by ``rounds x RTT / 2``: in an MPC round both parties send at once and
each only waits for the other's message, so a round needs one one-way delay, not a round
trip -- that is the bound the physics enforces; ``rounds x RTT`` is what a round costs
that waits for a reply (measured on the tun backend, mlp1 and lenet1 at 40 ms come in
*under* ``rounds x RTT``, so only the one-way figure is a true floor). Neither counts the client's own round trip to the parties (RTT/2
here, reported as ``client_rtt_ms``), the client's upload, TLS/TCP/IP header bytes
(payload only), or dealer traffic.

Setup and teardown are the script's own: the namespaces are named ``<prefix>-<host>``
(``--prefix``, default ``siwan``), leftovers of an earlier run with the same prefix
(namespaces, the processes in them, links) are removed first, and everything is torn down
in a ``finally`` (also on Ctrl-C / SIGTERM); a lock file keeps two runs with one prefix
apart. Needs root and ``ip`` (iproute2); ``tc`` for the netem backend.

    sudo .venv/bin/python scripts/bench_wan.py [--cases mlp1,lenet1] [--rtts 10,40]
        [--bandwidths 1000,100] [--repeat N] [--warmup N] [--backend auto|netem|tun]
        [--prefix siwan] [--subnet 10.213.0.0/24] [--parties 2] [--out FILE] [--keep-workdir]
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(SCRIPTS))

DEALER_PORT = 50050
PARTY_PORT0 = 50100  # party i: 50100 + 10 i; its data path: that + 1


def log(msg: str) -> None:
    print(f"[bench_wan] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- shell


class CommandError(RuntimeError):
    pass


def run(*args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(args)} -> {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def namespaces_available() -> tuple[bool, str]:
    """(True, "") if this process can make network namespaces, else (False, why)."""
    if not sys.platform.startswith("linux"):
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, "network namespaces need root (run as root / with sudo)"
    if shutil.which("ip") is None:
        return False, "the `ip` command (iproute2) is not installed"
    name = f"siprobe-{os.getpid()}"
    proc = run("ip", "netns", "add", name, check=False)
    if proc.returncode != 0:
        return False, f"`ip netns add` failed: {proc.stderr.strip()}"
    run("ip", "netns", "del", name, check=False)
    return True, ""


def netem_available(prefix: str) -> bool:
    """Whether the kernel has sch_netem (probed on the loopback of a scratch namespace)."""
    if shutil.which("tc") is None:
        return False
    ns = f"{prefix}-probe"
    run("ip", "netns", "add", ns)
    try:
        return run("tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False).returncode == 0
    finally:
        run("ip", "netns", "del", ns, check=False)


def tun_available() -> bool:
    return os.path.exists("/dev/net/tun")


def cleanup_prefix(prefix: str) -> list[str]:
    """Remove namespaces (and the processes in them) and links named ``<prefix>-*``."""
    removed: list[str] = []
    stem = f"{prefix}-"
    out = run("ip", "netns", "list", check=False).stdout
    for line in out.splitlines():
        ns = line.split()[0] if line.strip() else ""
        if not ns.startswith(stem):
            continue
        pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline and run("ip", "netns", "pids", ns, check=False).stdout.split():
            time.sleep(0.05)
        run("ip", "netns", "del", ns, check=False)
        removed.append(f"netns {ns}" + (f" ({len(pids)} process(es) killed)" if pids else ""))
    out = run("ip", "-o", "link", "show", check=False).stdout
    for line in out.splitlines():
        m = re.match(r"^\d+:\s+([^:@\s]+)", line)
        if m and m.group(1).startswith(stem):
            run("ip", "link", "del", m.group(1), check=False)
            removed.append(f"link {m.group(1)}")
    return removed


def leftovers(prefix: str) -> list[str]:
    stem = f"{prefix}-"
    ns = [ln.split()[0] for ln in run("ip", "netns", "list", check=False).stdout.splitlines() if ln.strip()]
    links = [m.group(1) for ln in run("ip", "-o", "link", "show", check=False).stdout.splitlines()
             if (m := re.match(r"^\d+:\s+([^:@\s]+)", ln))]
    return [f"netns {n}" for n in ns if n.startswith(stem)] + [f"link {n}" for n in links if n.startswith(stem)]


# ----------------------------------------------------------------------------- JSON-line child


class LineChild:
    """A subprocess that answers JSON lines (the relay, the driver), with timeouts."""

    def __init__(self, name: str, argv: list[str], *, stderr: IO[bytes] | int, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                     env=env, cwd=REPO, start_new_session=True, text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def recv(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no answer in {timeout:.0f}s") from None
        if line is None:
            raise CommandError(f"{self.name} exited (rc {self.proc.wait()})")
        return json.loads(line)

    def call(self, obj: dict[str, Any], *, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        ans = self.recv(timeout)
        if not ans.get("ok", False):
            raise CommandError(f"{self.name}: {obj.get('op', obj)} failed: {ans.get('error')}\n{ans.get('traceback', '')}")
        return ans

    def close(self, *, quit_msg: dict[str, Any] | None = None, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                if quit_msg is not None and self.proc.stdin is not None:
                    self.proc.stdin.write(json.dumps(quit_msg) + "\n")
                    self.proc.stdin.flush()
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)


# ----------------------------------------------------------------------------- network


@dataclass(frozen=True)
class HostNet:
    tag: str  # "d", "c", "p0", ...
    ns: str
    ip: str
    is_party: bool


class Network:
    """Namespaces + links; ``shape`` sets every party's access link (delay per qdisc, rate)."""

    backend = ""

    def __init__(self, prefix: str, hosts: list[HostNet], prefix_len: int) -> None:
        self.prefix, self.hosts, self.prefix_len = prefix, hosts, prefix_len

    def setup(self, *, slow_start_after_idle: bool) -> None:
        for h in self.hosts:
            run("ip", "netns", "add", h.ns)
            run("ip", "-n", h.ns, "link", "set", "lo", "up")
            value = "1" if slow_start_after_idle else "0"
            run("ip", "netns", "exec", h.ns, "sh", "-c", f"echo {value} > /proc/sys/net/ipv4/tcp_slow_start_after_idle")
        self._links()

    def _links(self) -> None:
        raise NotImplementedError

    def shape(self, delay_ms: float, rate_mbit: float | None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NetemNetwork(Network):
    """veth pairs on a bridge; netem on both ends of each party's veth."""

    backend = "netem"

    def _links(self) -> None:
        br = f"{self.prefix}-br"
        run("ip", "link", "add", br, "type", "bridge")
        run("ip", "link", "set", br, "up")
        for h in self.hosts:
            outer = f"{self.prefix}-{h.tag}"
            run("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            run("ip", "link", "set", outer, "master", br, "up")
            run("ip", "-n", h.ns, "addr", "add", f"{h.ip}/{self.prefix_len}", "dev", "eth0")
            run("ip", "-n", h.ns, "link", "set", "eth0", "up")

    def shape(self, delay_ms: float, rate_mbit: float | None) -> None:
        for h in self.hosts:
            if not h.is_party:
                continue
            # the bridge side's egress (towards the party) and the party's own egress
            for tc, dev in ((["tc"], f"{self.prefix}-{h.tag}"), (["tc", "-n", h.ns], "eth0")):
                if delay_ms <= 0 and rate_mbit is None:
                    run(*tc, "qdisc", "del", "dev", dev, "root", check=False)
                    continue
                spec = ["netem", "delay", f"{delay_ms:.4f}ms", "limit", "100000"]
                if rate_mbit is not None:
                    spec += ["rate", f"{rate_mbit:g}mbit"]
                run(*tc, "qdisc", "replace", "dev", dev, "root", *spec)


class TunNetwork(Network):
    """TUN devices joined by scripts/wan_relay.py (the same link model, in user space)."""

    backend = "tun"

    def __init__(self, prefix: str, hosts: list[HostNet], prefix_len: int, *, relay_nice: int | None,
                 relay_rt: int, log_dir: Path) -> None:
        super().__init__(prefix, hosts, prefix_len)
        self.relay: LineChild | None = None
        self.relay_nice = relay_nice
        self.relay_rt = relay_rt
        self.log_dir = log_dir

    def _links(self) -> None:
        self.control_socket = str(self.log_dir.parent / "relay.sock")
        argv = [sys.executable, str(SCRIPTS / "wan_relay.py"), "--control-socket", self.control_socket]
        for h in self.hosts:
            argv += ["--device", f"{self.prefix}-{h.tag}={h.ip}"]
        if self.relay_nice is not None:
            argv += ["--nice", str(self.relay_nice)]
        if self.relay_rt:
            argv += ["--rt-priority", str(self.relay_rt)]
        self._relay_log = open(self.log_dir / "relay.log", "ab")
        self.relay = LineChild("relay", argv, stderr=self._relay_log)
        self.relay.recv(timeout=30)  # {"ready": true}
        for h in self.hosts:
            dev = f"{self.prefix}-{h.tag}"
            run("ip", "link", "set", dev, "netns", h.ns)
            run("ip", "-n", h.ns, "addr", "add", f"{h.ip}/{self.prefix_len}", "dev", dev)
            run("ip", "-n", h.ns, "link", "set", dev, "up")

    def shape(self, delay_ms: float, rate_mbit: float | None) -> None:
        assert self.relay is not None
        links = {h.ip: ({"delay_ms": delay_ms, "rate_mbit": rate_mbit} if h.is_party else {"delay_ms": 0, "rate_mbit": None})
                 for h in self.hosts}
        self.relay.call({"links": links}, timeout=10)

    def stats(self, *, reset: bool = False) -> dict[str, Any]:
        assert self.relay is not None
        return self.relay.call({"stats": True, "reset": reset}, timeout=10)["stats"]

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close(quit_msg={"quit": True})
            self._relay_log.close()


# ----------------------------------------------------------------------------- topology


def write_wan_topology(
    path: Path, *, base_dir: Path, dealer_ip: str, party_ips: Sequence[str], pool_size: int,
    request_timeout_s: float, rpc_timeout_s: float,
) -> Path:
    """A topology whose dealer and parties listen on their own namespaces' IPs.

    Written by :func:`write_local_topology` (every field it knows, e.g. a party's data
    address) on fixed loopback ports, then each ``"127.0.0.1:PORT"`` is moved to the IP of
    the host that owns PORT; the result is loaded back (validated).
    """
    from secureinfer.config import load_topology, write_local_topology

    ports: dict[str | int, int] = {"dealer": DEALER_PORT}
    owner: dict[int, str] = {DEALER_PORT: dealer_ip}
    for i, ip in enumerate(party_ips):
        p = PARTY_PORT0 + 10 * i
        ports[i] = p
        ports[f"party{i}.data"] = p + 1  # keys a version of write_local_topology may not know are ignored
        owner[p] = owner[p + 1] = ip
    write_local_topology(path, base_dir=base_dir, n_parties=len(party_ips), ports=ports, name="wan",
                         include_he=False, pool_size=pool_size, request_timeout_s=request_timeout_s,
                         rpc_timeout_s=rpc_timeout_s, overwrite=True)

    def move(m: re.Match[str]) -> str:
        port = int(m.group(1))
        if port not in owner:
            raise RuntimeError(f"{path}: address 127.0.0.1:{port} belongs to no host of the WAN topology")
        return f'"{owner[port]}:{port}"'

    text = re.sub(r'"127\.0\.0\.1:(\d+)"', move, path.read_text())
    path.write_text(text.replace("# Loopback topology", "# WAN-benchmark topology (scripts/bench_wan.py), from a loopback topology"))
    topo = load_topology(path)
    for p, ip in zip(topo.parties, party_ips):
        for addr in (p.address, getattr(p, "data_address", "") or ""):
            if addr and not addr.startswith(f"{ip}:"):
                raise RuntimeError(f"party {p.id}: {addr} is not on {ip}")
    return path


# ----------------------------------------------------------------------------- the run


def _pct(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


class WanBench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.log_dir = workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        net = ipaddress.ip_network(args.subnet)
        addrs = list(net.hosts())
        if len(addrs) < 40:
            raise SystemExit(f"--subnet {args.subnet} is too small (need 40 host addresses)")
        pre = args.prefix
        self.dealer = HostNet("d", f"{pre}-d", str(addrs[9]), False)
        self.client = HostNet("c", f"{pre}-c", str(addrs[19]), False)
        self.parties = [HostNet(f"p{i}", f"{pre}-p{i}", str(addrs[29 + i]), True) for i in range(args.parties)]
        hosts = [self.dealer, *self.parties, self.client]
        self.net: Network
        if args.backend == "netem":
            self.net = NetemNetwork(pre, hosts, net.prefixlen)
        else:
            nice = None
            if os.geteuid() == 0 and args.relay_nice is not None:
                nice = args.relay_nice
            self.net = TunNetwork(pre, hosts, net.prefixlen, relay_nice=nice, relay_rt=args.relay_rt_priority,
                                  log_dir=self.log_dir)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.driver: LineChild | None = None
        self.config = workdir / "wan.toml"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args.party_threads is not None:
            self.env.update(OMP_NUM_THREADS=str(args.party_threads), MKL_NUM_THREADS=str(args.party_threads))
        self.delay_ms = 0.0
        self.base_rtt_ms = 0.0

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, ns: str, argv: list[str]) -> None:
        with open(self.log_dir / f"{name}.log", "ab") as fh:
            self.procs[name] = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=fh, stderr=subprocess.STDOUT,
                                                env=self.env, cwd=REPO, start_new_session=True)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise CommandError(f"{name} exited with {proc.returncode}:\n{tail}")

    def start(self) -> None:
        from secureinfer.certs import create_certificates
        from secureinfer.config import load_topology

        self.net.setup(slow_start_after_idle=self.args.slow_start_after_idle)
        write_wan_topology(self.config, base_dir=self.workdir, dealer_ip=self.dealer.ip,
                           party_ips=[p.ip for p in self.parties], pool_size=self.args.pool_size,
                           request_timeout_s=self.args.request_timeout, rpc_timeout_s=self.args.rpc_timeout)
        create_certificates(load_topology(self.config), overwrite=True)
        py = [sys.executable, "-m", "secureinfer"]
        self._spawn("dealer", self.dealer.ns, [*py, "dealer", "--config", str(self.config)])
        for i, p in enumerate(self.parties):
            self._spawn(f"party{i}", p.ns, [*py, "party", "--id", str(i), "--config", str(self.config)])
        self._driver_log = open(self.log_dir / "driver.log", "ab")
        self.driver = LineChild("driver", ["ip", "netns", "exec", self.client.ns, sys.executable,
                                           str(SCRIPTS / "bench_wan_driver.py"), "serve", "--config", str(self.config)],
                                stderr=self._driver_log, env=self.env)
        self.driver.recv(timeout=120)  # hello
        try:
            ready = self.driver.call({"op": "ready", "timeout": 90.0}, timeout=120)
        except CommandError:
            self.check_alive()
            raise
        self.check_alive()
        log(f"cluster ready in {ready['seconds']:.1f}s (backend {self.net.backend}, workdir {self.workdir})")

    def stop(self) -> None:
        if self.driver is not None:
            self.driver.close(quit_msg={"op": "quit"}, timeout=15)
            self._driver_log.close()
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
        self.net.close()

    # ------------------------------------------------------------------ network
    def ping(self, src: HostNet, dst: HostNet, count: int = 20) -> list[float]:
        out = run("ip", "netns", "exec", src.ns, sys.executable, str(SCRIPTS / "bench_wan_driver.py"), "ping",
                  "--to", dst.ip, "--count", str(count), "--interval", "0.02", timeout=60).stdout
        rtts = json.loads(out)["rtt_ms"]
        if not rtts:
            raise CommandError(f"no ICMP echo from {dst.ns} ({dst.ip}) to {src.ns}")
        return rtts

    def apply(self, rtt_ms: float, rate_mbit: float | None) -> tuple[list[float], float]:
        """Shape for a target party-to-party RTT; returns (party RTTs, median client RTT).

        Calibrated on the *minimum* echo time (queueing behind other traffic only adds to
        it): ``D = (target - unshaped minimum) / 4``, then one correction step if the
        shaped minimum still misses the target by more than 1%.
        """
        if rtt_ms <= 0 and rate_mbit is None:
            self.delay_ms = 0.0
        else:
            base = self.base_rtt_ms if self.args.calibrate else 0.0
            self.delay_ms = max(0.0, rtt_ms - base) / 4
        self.net.shape(self.delay_ms, rate_mbit)
        time.sleep(0.05)
        party_rtts = self.ping(self.parties[0], self.parties[1])
        if self.args.calibrate and self.delay_ms > 0 and abs(min(party_rtts) - rtt_ms) > 0.01 * rtt_ms:
            self.delay_ms = max(0.0, self.delay_ms + (rtt_ms - min(party_rtts)) / 4)
            self.net.shape(self.delay_ms, rate_mbit)
            time.sleep(0.05)
            party_rtts = self.ping(self.parties[0], self.parties[1])
        client_rtt = statistics.median(self.ping(self.client, self.parties[0], count=10))
        return party_rtts, client_rtt

    # ------------------------------------------------------------------ measurement
    def run_case(self, case_name: str) -> list[dict[str, Any]]:
        from bench import CASES

        assert self.driver is not None
        case = CASES[case_name]
        args = self.args
        n = args.repeat or case.measured
        warmup = case.warmup if args.warmup is None else args.warmup
        rows: list[dict[str, Any]] = []
        self.apply(0, None)
        dep = self.driver.call({"op": "deploy", "case": case_name, "name": case_name}, timeout=600)
        log(f"{case_name}: {case.description}; deployed in {dep['seconds']:.1f}s")
        settings: list[tuple[float, float | None]] = [(0.0, None)]
        if not args.baseline_only:
            settings += [(r, b) for r in args.rtts for b in args.bandwidths]
        baseline: float | None = None
        offline_per_party = 0.0
        for rtt, bw in settings:
            party_rtts, client_rtt = self.apply(rtt, bw)
            party_rtt = statistics.median(party_rtts)
            if rtt == 0 and bw is None:
                self.base_rtt_ms = min(party_rtts)
            log(f"{case_name}: RTT target {rtt:g} ms, measured party0<->party1 {party_rtt:.3f} ms "
                f"(min {min(party_rtts):.3f}), "
                f"client<->party0 {client_rtt:.3f} ms; bandwidth {bw or 'unlimited'} Mbit/s; "
                f"netem-equivalent delay {self.delay_ms:.3f} ms per qdisc")
            settle = 0.3 + 4 * rtt / 1e3 + (2 * offline_per_party * 8 / (bw * 1e6) if bw else 0.0)
            t0 = time.monotonic()
            if isinstance(self.net, TunNetwork):
                self.net.stats(reset=True)
            relay_socket = self.net.control_socket if isinstance(self.net, TunNetwork) else None
            res = self.driver.call({"op": "measure", "case": case_name, "name": case_name, "warmup": warmup, "n": n,
                                    "settle_s": settle, "timeout_s": 120.0 + 10 * settle, "relay_socket": relay_socket},
                                   timeout=600 + n * (settle + 60))
            self.check_alive()
            costs = res["costs"]
            lat = [c["latency_ms"] for c in costs]
            med = statistics.median(lat)
            c0 = costs[0]
            offline_per_party = max(c["bytes_offline"] for c in costs) / len(self.parties)
            rounds, bytes_online = c0["rounds"], c0["bytes_online"]
            per_party = bytes_online / len(self.parties)
            transfer_ms = per_party * 8 / (bw * 1e6) * 1e3 if bw else 0.0
            lb = rounds * rtt + transfer_ms
            lb1 = rounds * rtt / 2 + transfer_ms
            if baseline is None:
                baseline = med
            row = {
                "case": case_name, "backend": self.net.backend, "n_parties": len(self.parties),
                "rtt_ms": rtt, "rtt_measured_ms": _r(party_rtt, 3), "rtt_measured_min_ms": _r(min(party_rtts), 3), "client_rtt_ms": _r(client_rtt, 3),
                "bandwidth_mbit": bw, "requests": n,
                "latency_ms_median": _r(med), "latency_ms_p90": _r(_pct(lat, 90)),
                "party_ms_median": _r(statistics.median(max(c["party_latency_ms"]) for c in costs)),
                "rounds": rounds, "bytes_online": bytes_online, "bytes_per_party": _r(per_party, 1),
                "bytes_offline": c0["bytes_offline"], "bytes_client_up": c0["bytes_client_up"],
                "lower_bound_ms": _r(lb, 3), "ratio": _r(med / lb, 3) if lb > 0 else None,
                "lower_bound_oneway_ms": _r(lb1, 3), "ratio_oneway": _r(med / lb1, 3) if lb1 > 0 else None,
                "baseline_ms_median": _r(baseline),
                "lower_bound_plus_compute_ms": _r(lb + baseline, 3),
                "ratio_plus_compute": _r(med / (lb + baseline), 3),
                "argmax_agreement": res["argmax_agreement"], "max_abs_error": res["max_abs_error"],
                "tcp_slow_start_after_idle": int(args.slow_start_after_idle),
                "delay_per_qdisc_ms": _r(self.delay_ms, 4),
                "settle_s": _r(settle, 3), "seconds": _r(time.monotonic() - t0, 1),
                "dealer_counters": res["dealer_counters"],
            }
            if res.get("wire_bytes"):
                keys = sorted({k for w in res["wire_bytes"] for k in w})
                names = {f"{self.args.prefix}-{h.tag}": h.tag for h in [self.dealer, *self.parties, self.client]}

                def short(k: str) -> str:
                    a, b = k.split(">")
                    return f"{names.get(a, a)}>{names.get(b, b)}"

                row["wire_bytes_per_request"] = {short(k): int(statistics.median(w.get(k, 0) for w in res["wire_bytes"]))
                                                 for k in keys}
            if isinstance(self.net, TunNetwork):
                st = self.net.stats()
                row["relay_max_late_ms"] = st.get("max_late_ms")
                row["relay_events_late_over_1ms"] = st.get("late_over_1ms")
                row["relay_events"] = st.get("events")
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with args.out.open("a") as fh:
                    fh.write(line + "\n")
            log(f"{case_name}: median {med:.1f} ms, p90 {row['latency_ms_p90']:.1f} ms, lower bound {lb:.1f} ms "
                f"(+compute {lb + baseline:.1f} ms)")
        return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("case", "RTT ms", "meas.", "Mbit/s", "median", "p90", "rounds", "B/party", "LB ms", "ratio",
            "LB1way", "ratio", "LB+comp", "ratio", "wire p0>p1", "wire d>p*")
    lines = [head]
    for r in rows:
        lines.append((
            r["case"], f"{r['rtt_ms']:g}", f"{r['rtt_measured_ms']:.2f}", str(r["bandwidth_mbit"] or "-"),
            f"{r['latency_ms_median']:.1f}", f"{r['latency_ms_p90']:.1f}", str(r["rounds"]), f"{r['bytes_per_party']:.0f}",
            f"{r['lower_bound_ms']:.1f}", "-" if r["ratio"] is None else f"{r['ratio']:.2f}",
            f"{r['lower_bound_oneway_ms']:.1f}", "-" if r["ratio_oneway"] is None else f"{r['ratio_oneway']:.2f}",
            f"{r['lower_bound_plus_compute_ms']:.1f}", f"{r['ratio_plus_compute']:.2f}",
            str(wire.get("p0>p1", "-")) if (wire := r.get("wire_bytes_per_request")) else "-",
            str(sum(v for k, v in wire.items() if k.startswith("d>p"))) if wire else "-",
        ))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append("LB = rounds x RTT + B/party x 8 / bandwidth; LB1way = rounds x RTT/2 + the same; "
               "LB+comp = LB + the baseline's median; wire = median bytes on the wire per request "
               "(tun backend): party 0 to party 1, dealer to the parties")
    print("\n".join(out), file=sys.stderr, flush=True)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="mlp1,lenet1", help="comma-separated names from scripts/bench.py CASES")
    ap.add_argument("--rtts", type=_floats, default=[10.0, 40.0], help="party-to-party RTTs in ms (default 10,40)")
    ap.add_argument("--bandwidths", type=_floats, default=[1000.0, 100.0], help="Mbit/s (default 1000,100)")
    ap.add_argument("--repeat", type=int, default=None, help="measured requests per setting (default: the case's)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up requests per setting (default: the case's)")
    ap.add_argument("--backend", choices=("auto", "netem", "tun"), default="auto")
    ap.add_argument("--prefix", default="siwan", help="namespace/link name prefix, [a-z0-9], at most 8 characters")
    ap.add_argument("--subnet", default="10.213.0.0/24", help="the hosts' IPv4 subnet (inside the namespaces only)")
    ap.add_argument("--parties", type=int, default=2)
    ap.add_argument("--pool-size", type=int, default=4)
    ap.add_argument("--party-threads", type=int, default=None, help="OMP/MKL threads of dealer and parties")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--rpc-timeout", type=float, default=20.0)
    ap.add_argument("--relay-nice", type=int, default=0,
                    help="niceness of the tun backend's relay (default 0: ahead of a run under `nice -n 10`)")
    ap.add_argument("--relay-rt-priority", type=int, default=10,
                    help="SCHED_FIFO priority of the tun backend's relay (default 10; 0 = normal scheduling)")
    ap.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                    help="delay per qdisc = RTT/4 exactly, not reduced by the unshaped RTT")
    ap.add_argument("--slow-start-after-idle", action="store_true",
                    help="keep the kernel default net.ipv4.tcp_slow_start_after_idle = 1 in the namespaces")
    ap.add_argument("--baseline-only", action="store_true", help="measure only the unshaped network")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON lines to this file")
    ap.add_argument("--workdir", type=Path, default=None, help="topology, certificates, logs (default: a temp dir)")
    ap.add_argument("--keep-workdir", action="store_true", help="do not delete the (temporary) workdir")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", args.prefix):
        ap.error("--prefix must be [a-z][a-z0-9]{0,7} (interface names have at most 15 characters)")
    if args.parties < 2:
        ap.error("--parties must be at least 2")
    if args.repeat is not None and args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if any(r <= 0 for r in args.rtts) or any(b <= 0 for b in args.bandwidths):
        ap.error("RTTs and bandwidths must be positive")
    from bench import CASES

    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown or not args.cases:
        ap.error(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ok, why = namespaces_available()
    if not ok:
        log(f"cannot run: {why}")
        return 2
    lock_dir = Path("/run/lock") if Path("/run/lock").is_dir() else Path(tempfile.gettempdir())
    lock = open(lock_dir / f"secureinfer-bench-wan-{args.prefix}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another bench_wan run holds prefix {args.prefix!r} ({lock.name}); use another --prefix")
        return 2

    def _raise(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`cmd &`)
    for item in cleanup_prefix(args.prefix):
        log(f"removed leftover of an earlier run: {item}")
    if args.backend == "auto":
        args.backend = "netem" if netem_available(args.prefix) else "tun"
        if args.backend == "tun":
            log("this kernel has no sch_netem (tc: 'Specified qdisc kind is unknown'); "
                "links are emulated by scripts/wan_relay.py (TUN devices)")
    elif args.backend == "netem" and not netem_available(args.prefix):
        if not args.baseline_only:
            log("--backend netem: this kernel has no sch_netem; use --backend tun (or --baseline-only)")
            return 2
        log("--backend netem without sch_netem: the veth/bridge network runs unshaped (--baseline-only)")
    if args.backend == "tun" and not tun_available():
        log("--backend tun needs /dev/net/tun")
        return 2
    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="secureinfer-wan-")
        workdir = Path(tmp)
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    if args.out:
        args.out.write_text("")
    rows: list[dict[str, Any]] = []
    bench: WanBench | None = None
    rc = 0
    try:
        bench = WanBench(args, workdir)
        bench.start()
        for case in args.cases:
            rows += bench.run_case(case)
    except (Exception, KeyboardInterrupt) as exc:
        rc = 130 if isinstance(exc, KeyboardInterrupt) else 1
        log(f"FAILED: {exc!r}" if rc == 1 else "interrupted")
        if bench is not None and rc == 1:
            for name in [*bench.procs, "driver", "relay"]:
                path = bench.log_dir / f"{name}.log"
                if path.exists():
                    log(f"--- tail of {name}.log ---\n{path.read_text(errors='replace')[-1500:]}")
    finally:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the teardown
        try:
            if bench is not None:
                try:
                    bench.stop()
                except Exception as exc:  # the namespaces go anyway
                    log(f"stopping processes: {exc!r}")
            for item in cleanup_prefix(args.prefix):
                log(f"teardown: removed {item}")
            left = leftovers(args.prefix)
            if left:
                log(f"teardown left: {left}")
                rc = rc or 1
            else:
                log(f"teardown complete: no namespace or link named {args.prefix}-* remains")
            if tmp is not None and not args.keep_workdir:
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp is not None:
                log(f"workdir kept: {tmp}")
        finally:
            signal.signal(signal.SIGINT, old)
            lock.close()
    if rows:
        print_table(rows)
    return rc


if __name__ == "__main__":
    sys.exit(main())
