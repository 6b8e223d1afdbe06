"""A user-space WAN link emulator: TUN devices joined by a delaying, rate-limiting switch.

Used by ``scripts/bench_wan.py`` when the kernel has no ``sch_netem`` (``tc qdisc ...
netem`` answers "Specified qdisc kind is unknown"), as on the 2-core development VM whose
kernel is built without ``CONFIG_NET_SCH_NETEM``. It emulates exactly what netem gives
with ``delay D rate R`` on both ends of a host's veth (its egress inside the namespace and
the bridge side's egress towards it):

* every host ``h`` has an **access link** with a one-way delay ``d_h`` and a rate ``r_h``
  (``None`` = unlimited) in each direction: an *uplink* (host -> switch) and a *downlink*
  (switch -> host), each a FIFO that serializes packets at ``r_h`` (store and forward) and
  then delays them by ``d_h``;
* a packet from ``a`` to ``b`` therefore takes ``size/r_a + d_a`` on ``a``'s uplink, then
  ``size/r_b + d_b`` on ``b``'s downlink, queued behind earlier packets on each link;
  the round-trip time between ``a`` and ``b`` is ``2 (d_a + d_b)`` plus serialization;
* a link whose backlog would exceed ``limit_bytes`` drops the packet (tail drop, as a
  netem/pfifo queue of ``limit`` packets does).

Wire size of a packet: its IP length plus 14 bytes of Ethernet header per segment (what
netem's ``rate`` counts on a veth); a GSO super-packet (see below) is counted as the
segments it stands for, each with its own headers.

Mechanics: one TUN device per host (``IFF_TUN | IFF_NO_PI | IFF_VNET_HDR``, named by the
caller), created here in the root namespace; the caller moves each into its host's
namespace (``ip link set NAME netns NS``) and configures its address and route. The
devices are not persistent, so they disappear when this process exits, whatever the
reason. With ``TUNSETOFFLOAD`` (checksum + TSO) the kernel hands over TCP super-packets of
up to 64 KiB with their ``virtio_net_hdr``, which are written unchanged into the
destination device (as a hypervisor's virtual switch does): the segmentation happens
nowhere, so the relay handles ~40 times fewer packets than at MTU size, while the rate
model above still charges every segment's headers. Packets are routed by destination
IPv4 address; anything else (IPv6, unknown destinations) is dropped.

Timing: an event heap (uplink done -> downlink done -> delivered), woken by
``select()`` whose timeout has microsecond resolution (``epoll``'s is 1 ms); events run
late by the scheduler's wake-up latency (tens of microseconds on an idle core, but tens of
milliseconds on a loaded one under normal scheduling, hence ``--rt-priority``: with
``SCHED_FIFO`` the relay runs ahead of every normal process, as netem's timers run in
softirq context; the kernel's RT throttling, 95% of a core by default, bounds what a
flood can take). The ``stats`` command reports how late events ran.

Protocol (JSON lines): on start the relay prints ``{"ready": true, "devices": [...]}``
to stdout. Each line on stdin is a command answered by one line on stdout:

* ``{"links": {"<ip>": {"delay_ms": d, "rate_mbit": r | null}, ...}}`` sets links
  (hosts not named keep theirs; a new setting applies to packets read from then on);
* ``{"stats": true[, "reset": true]}`` -> counters (packets, bytes, drops per link;
  ``pairs``: packets and wire bytes per ``"src>dst"`` device pair, counted on arrival; how
  late events ran: the maximum and how many by more than 1 ms; ``reset`` restarts the
  lateness counters after answering);
* end of stdin or ``{"quit": true}``: exit (the devices vanish).

With ``--control-socket PATH`` the same commands are also answered on a Unix socket (a
file, so reachable from every network namespace): ``bench_wan_driver.py`` reads the link
counters there before and after each request, which gives the bytes that really crossed
each access link per request.

    python scripts/wan_relay.py --device NAME=IP [--device NAME=IP ...] [--limit-bytes N]
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import ipaddress
import json
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
VNET_HDR_LEN = 10  # struct virtio_net_hdr (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
ETH_HDR = 14
MAX_FRAME = VNET_HDR_LEN + 65535 + 64


def open_tun(name: str, *, offload: bool = True) -> int:
    """A non-blocking fd of a new (non-persistent) TUN device ``name`` with vnet headers."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        if offload:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass
class Link:
    """One direction of a host's access link: FIFO, serialization at ``rate``, then ``delay``."""

    delay_s: float = 0.0
    rate_bps: float | None = None  # bits per second; None = unlimited
    limit_bytes: int = 1 << 22
    free_at: float = 0.0  # when the link finishes serializing what it has accepted
    packets: int = 0
    bytes: int = 0
    drops: int = 0

    def accept(self, now: float, wire_bytes: int) -> float | None:
        """Time the packet leaves this link's far end, or None if the queue is full (dropped)."""
        if self.rate_bps is None:
            done = now
        else:
            start = max(now, self.free_at)
            if (start - now) * self.rate_bps / 8 > self.limit_bytes:
                self.drops += 1
                return None
            done = start + wire_bytes * 8 / self.rate_bps
            self.free_at = done
        self.packets += 1
        self.bytes += wire_bytes
        return done + self.delay_s


@dataclass
class Host:
    name: str
    ip: bytes
    fd: int
    up: Link = field(default_factory=Link)
    down: Link = field(default_factory=Link)

    @property
    def shaped(self) -> bool:
        return bool(self.up.delay_s or self.up.rate_bps or self.down.delay_s or self.down.rate_bps)


def wire_size(frame: bytes) -> int:
    """Bytes on an Ethernet wire for one frame read from the TUN device (vnet header first)."""
    ip_len = len(frame) - VNET_HDR_LEN
    _flags, gso_type, hdr_len, gso_size = struct.unpack_from("<BBHH", frame, 0)
    if gso_type and gso_size and hdr_len and ip_len > hdr_len:
        segs = -(-(ip_len - hdr_len) // gso_size)
        return ip_len + (segs - 1) * hdr_len + segs * ETH_HDR
    return ip_len + ETH_HDR


class Relay:
    def __init__(self, devices: list[tuple[str, str]], *, limit_bytes: int) -> None:
        self.hosts: dict[bytes, Host] = {}
        self.by_fd: dict[int, Host] = {}
        self.limit_bytes = limit_bytes
        for name, ip in devices:
            packed = ipaddress.IPv4Address(ip).packed
            h = Host(name, packed, open_tun(name), Link(limit_bytes=limit_bytes), Link(limit_bytes=limit_bytes))
            self.hosts[packed] = h
            self.by_fd[h.fd] = h
        self.heap: list[tuple[float, int, int, Host, Host, bytes, int]] = []
        self.seq = 0
        self.pairs: dict[tuple[str, str], list[int]] = {}  # (src, dst) -> [packets, wire bytes]
        self.dropped_unroutable = 0
        self.max_late_s = 0.0
        self.late_1ms = 0  # events run more than 1 ms after their due time
        self.events = 0
        self.write_errors = 0

    # ------------------------------------------------------------------ configuration
    def configure(self, links: dict[str, dict[str, float | None]]) -> None:
        for ip, spec in links.items():
            h = self.hosts[ipaddress.IPv4Address(ip).packed]
            delay = float(spec.get("delay_ms") or 0.0) / 1e3
            rate = spec.get("rate_mbit")
            rate_bps = float(rate) * 1e6 if rate else None
            for link in (h.up, h.down):
                link.delay_s, link.rate_bps = delay, rate_bps

    def stats(self) -> dict[str, object]:
        return {
            "hosts": {
                h.name: {"up": [h.up.packets, h.up.bytes, h.up.drops], "down": [h.down.packets, h.down.bytes, h.down.drops]}
                for h in self.hosts.values()
            },
            "pairs": {f"{a}>{b}": v for (a, b), v in self.pairs.items()},
            "unroutable": self.dropped_unroutable, "write_errors": self.write_errors,
            "max_late_ms": round(self.max_late_s * 1e3, 3), "events": self.events, "late_over_1ms": self.late_1ms,
            "queued": len(self.heap),
        }

    def reset_lateness(self) -> None:
        self.max_late_s, self.late_1ms, self.events = 0.0, 0, 0

    # ------------------------------------------------------------------ data path
    def _write(self, dst: Host, frame: bytes) -> None:
        try:
            os.write(dst.fd, frame)
        except OSError:  # device gone / queue full: the packet is lost, as on a wire
            self.write_errors += 1

    def _receive(self, src: Host, frame: bytes, now: float) -> None:
        if len(frame) < VNET_HDR_LEN + 20 or frame[VNET_HDR_LEN] >> 4 != 4:
            self.dropped_unroutable += 1
            return
        dst = self.hosts.get(frame[VNET_HDR_LEN + 16 : VNET_HDR_LEN + 20])
        if dst is None or dst is src:
            self.dropped_unroutable += 1
            return
        size = wire_size(frame)
        pair = self.pairs.get((src.name, dst.name))
        if pair is None:
            pair = self.pairs[(src.name, dst.name)] = [0, 0]
        pair[0] += 1
        pair[1] += size
        if not src.shaped and not dst.shaped:
            self._write(dst, frame)
            return
        t = src.up.accept(now, size)
        if t is None:
            return
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, 1, src, dst, frame, size))

    def _event(self, now: float) -> None:
        due, _seq, stage, src, dst, frame, size = heapq.heappop(self.heap)
        late = now - due
        self.events += 1
        if late > self.max_late_s:
            self.max_late_s = late
        if late > 1e-3:
            self.late_1ms += 1
        if stage == 1:  # arrived at the switch: enter the destination's downlink
            t = dst.down.accept(due, size)
            if t is None:
                return
            if t <= now:
                self._write(dst, frame)
            else:
                self.seq += 1
                heapq.heappush(self.heap, (t, self.seq, 2, src, dst, frame, size))
        else:
            self._write(dst, frame)

    def run(self, control_fd: int, listener: socket.socket | None = None) -> None:
        """Serve until stdin closes. ``listener``: a Unix socket answering the same commands
        (one line, one answer), e.g. for ``stats`` from a process in another namespace."""
        base = list(self.by_fd) + [control_fd] + ([listener.fileno()] if listener else [])
        conns: dict[int, tuple[socket.socket, bytearray]] = {}
        buf = b""
        while True:
            now = time.monotonic()
            while self.heap and self.heap[0][0] <= now:
                self._event(now)
                now = time.monotonic()
            timeout = None if not self.heap else max(0.0, self.heap[0][0] - now)
            readable, _, _ = select.select(base + list(conns), [], [], timeout)
            now = time.monotonic()
            for fd in readable:
                if fd == control_fd:
                    chunk = os.read(control_fd, 65536)
                    if not chunk:
                        return
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip() and not self._command(line, _reply):
                            return
                    continue
                if listener is not None and fd == listener.fileno():
                    conn, _ = listener.accept()
                    conns[conn.fileno()] = (conn, bytearray())
                    continue
                if fd in conns:
                    conn, cbuf = conns[fd]
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        conn.close()
                        del conns[fd]
                        continue
                    cbuf += chunk
                    while b"\n" in cbuf:
                        line, _, rest = bytes(cbuf).partition(b"\n")
                        cbuf[:] = rest
                        if line.strip():
                            self._command(line, lambda obj, c=conn: c.sendall((json.dumps(obj) + "\n").encode()),
                                          allow_quit=False)
                    continue
                src = self.by_fd[fd]
                for _ in range(64):  # bounded, so timers are not starved by a busy device
                    try:
                        frame = os.read(fd, MAX_FRAME)
                    except BlockingIOError:
                        break
                    except OSError:
                        break
                    self._receive(src, frame, now)

    def _command(self, line: bytes, reply: Callable[[dict[str, object]], None], *, allow_quit: bool = True) -> bool:
        try:
            cmd = json.loads(line)
            if cmd.get("quit") and not allow_quit:
                reply({"ok": False, "error": "quit only on stdin"})
            elif cmd.get("quit"):
                reply({"ok": True})
                return False
            elif "links" in cmd:
                self.configure(cmd["links"])
                reply({"ok": True})
            elif cmd.get("stats"):
                reply({"ok": True, "stats": self.stats()})
                if cmd.get("reset"):
                    self.reset_lateness()
            else:
                reply({"ok": False, "error": f"unknown command {cmd!r}"})
        except (ValueError, KeyError, TypeError) as exc:
            reply({"ok": False, "error": repr(exc)})
        return True


def _reply(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", action="append", default=[], metavar="NAME=IP", help="a TUN device and its host's IPv4 address")
    ap.add_argument("--control-socket", default=None, metavar="PATH",
                    help="also answer commands on this Unix socket (quit excepted: only stdin ends the relay)")
    ap.add_argument("--limit-bytes", type=int, default=4 << 20, help="queue limit of each link direction")
    ap.add_argument("--nice", type=int, default=None, help="set this process's niceness (root may lower it)")
    ap.add_argument("--rt-priority", type=int, default=0,
                    help="run under SCHED_FIFO at this priority (1..99; root): wake-ups then never wait "
                         "for other processes, as netem's timers do in the kernel; 0 = normal scheduling")
    args = ap.parse_args(argv)
    if args.rt_priority:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.rt_priority))
        except OSError as exc:
            print(f"[wan_relay] cannot use SCHED_FIFO {args.rt_priority}: {exc}", file=sys.stderr)
    if args.nice is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except OSError as exc:
            print(f"[wan_relay] cannot set niceness {args.nice}: {exc}", file=sys.stderr)
    devices = [tuple(d.split("=", 1)) for d in args.device]
    relay = Relay(devices, limit_bytes=args.limit_bytes)  # type: ignore[arg-type]
    listener = None
    if args.control_socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(args.control_socket)
        os.chmod(args.control_socket, 0o600)
        listener.listen(8)
    _reply({"ready": True, "devices": [d[0] for d in devices]})
    try:
        relay.run(sys.stdin.fileno(), listener)
    except KeyboardInterrupt:
        pass
    finally:
        if listener is not None:
            listener.close()
            os.unlink(args.control_socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
