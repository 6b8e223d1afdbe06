"""Generating sets of material: in the dealer process, or in worker processes beside it.

A *set* is one request's correlated randomness for every party (see ``dealer/core.py``):
the planner's :func:`~secureinfer.engine.plan.generate_request_material` run on a fresh
:class:`~secureinfer.dealer.material.BundleBuilder`, each party's bundle serialized once.
:func:`generate_parts` does that; :func:`fixed_masks` expands a deployment's fixed weight
masks ``B`` from its model seeds (HKDF-derived by the dealer, see ``DealerCore.register``).

Why worker processes. Generation is Python and numpy code that holds the interpreter
lock for most of its time. Run in a thread of the dealer process it delays the RPC
threads serving Bind, Claim and Prefetch by up to the interpreter's switch interval each
time they need the lock, however low the thread's scheduling priority: measured on this
2-core machine, a 0.6 ms probe loop took 2.7 ms median, 5.8 ms p90 and 12 ms at worst
beside a LeNet batch-1 generation thread at nice +10, and 0.61 ms median / 0.71 ms p90
beside the same generation in a process at nice +10. A :class:`GenerationWorker` is one
spawned process that generates sets for one caller; the OS scheduler, not the
interpreter lock, then divides the CPU, and a nice value on the worker really yields it.

Nice is not quite enough for the deep filler. Two parties computing a request alternate
between compute and waiting on each other's round, and a nice +10 worker takes every
gap: measured with the CPU time of every thread during the first MLP batch-100 request
after a deploy, the nice +10 worker used 40-100 ms of CPU within an 80-150 ms request
whose parties computed 30 ms each. ``idle_class`` puts the worker in Linux's
``SCHED_IDLE`` class (weight 3 against 1024 for nice 0, no privilege needed), where the
same measurement gave it 10-30 ms. Only a worker can be put there: a dealer thread in that
class could hold the interpreter lock or the pool lock while starved.

The worker (a fresh ``python`` interpreter started by the dealer) is sent a :class:`ModelSpec` (the public graph, the model seeds, the party
count) with each job and rebuilds the deployment's masks from the seeds once, keeping
the last :data:`WORKER_MODELS` deployments. Jobs and replies cross a local pipe between
the dealer and its own child process (``multiprocessing`` connections, which pickle the
job and the reply's header; the parts follow as raw bytes): nothing from the network is
unpickled, and the seeds never leave the dealer's host.
Randomness in the worker comes from ``os.urandom`` seeds like everywhere else
(:mod:`secureinfer.prg`); the worker is a new interpreter, never a fork, so it shares no
PRG state, lock or gRPC thread with the dealer.

Cost of a worker: one interpreter with torch imported (~1.6 s of CPU at start, done in
the background while the dealer starts) and the set's bytes copied once through the pipe
(a LeNet batch-32 set, 412 MB, in ~0.2 s against ~2 s to generate it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections import OrderedDict
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from secureinfer.dealer.material import BundleBuilder
from secureinfer.dealer.wire import bundle_to_bytes
from secureinfer.engine.ops import OPS
from secureinfer.engine.plan import compile_plan, fixed_operand_shapes, generate_request_material
from secureinfer.errors import SecureInferError
from secureinfer.graph.ir import Graph

__all__ = ["GenerationError", "GenerationWorker", "ModelSpec", "WORKER_MODELS", "fixed_masks", "generate_parts"]

#: deployments whose masks a worker keeps (least recently used dropped)
WORKER_MODELS = 8


class GenerationError(SecureInferError):
    """A worker process failed to generate a set, or died doing it."""


class ModelSpec(NamedTuple):
    """What a worker needs to generate a deployment's sets."""

    key: str  # identifies the deployment and its seeds (digest and nonce)
    graph_json: bytes  # the public graph (:meth:`Graph.public_json`)
    seeds: tuple[bytes, ...]  # every party's model seed
    n_parties: int


def fixed_masks(graph: Graph, seeds: list[bytes] | tuple[bytes, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A deployment's fixed weight masks ``B``, prepared for the engine and raw.

    Each fixed operand ``<node>/<attr>`` (:func:`~secureinfer.engine.plan.fixed_operand_shapes`)
    gets ``B`` expanded from the parties' model seeds; the prepared form is what the
    op's material generation uses, the raw one what a watermark audit flattens.
    """
    b = BundleBuilder(len(seeds), seeds=list(seeds))
    nodes = {n.name: n for n in graph.nodes}
    masks: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    for key, shape in fixed_operand_shapes(graph).items():
        node_name, attr = key.rsplit("/", 1)
        raw[key] = b.random(f"{key}/B", shape)
        masks[key] = OPS[nodes[node_name].op].prepare(nodes[node_name], attr, raw[key])
    return masks, raw


def generate_parts(graph: Graph, masks: dict[str, Any], *, n_parties: int, batch: int, purpose: str) -> list[bytes]:
    """One set of (batch, purpose): every party's serialized bundle, in party order."""
    plan = compile_plan(graph, batch=batch, n_parties=n_parties, argmax=purpose == "argmax",
                        dp_clip=1.0 if purpose == "dp" else None)  # the bound is not in the material
    b = BundleBuilder(n_parties)
    generate_request_material(plan, b, masks)
    return [bundle_to_bytes(b.party_bundle(p)) for p in range(n_parties)]


def _main() -> None:
    """The worker process's entry: ``python -c "...; _main()" FD``."""
    _serve(Connection(int(sys.argv[1])))


def _serve(conn: Connection) -> None:
    """The worker's loop: one job at a time until the dealer closes its end."""
    import torch

    torch.set_num_threads(1)
    models: OrderedDict[str, tuple[Graph, dict[str, Any]]] = OrderedDict()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the dealer is gone or stopped us
        try:
            spec, batch, purpose = job
            entry = models.get(spec.key)
            if entry is None:
                graph = Graph.from_public_json(spec.graph_json)
                entry = (graph, fixed_masks(graph, spec.seeds)[0])
                models[spec.key] = entry
                while len(models) > WORKER_MODELS:
                    models.popitem(last=False)
            models.move_to_end(spec.key)
            parts = generate_parts(entry[0], entry[1], n_parties=spec.n_parties, batch=batch, purpose=purpose)
            reply: tuple[Any, ...] = ("ok", len(parts))
        except Exception as e:  # reported to the caller, who decides; the worker lives on
            parts, reply = [], ("error", f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
            for part in parts:  # raw, not pickled: one copy less of up to tens of MB on each side
                conn.send_bytes(part)
        except (BrokenPipeError, OSError):
            return


class GenerationWorker:
    """One spawned process that generates sets for one caller at a time.

    :meth:`generate` sends a job and waits for its reply; a worker that died (killed,
    out of memory) is reported as :class:`GenerationError` and restarted by the next
    call. :meth:`stop` ends the process (a job under way is abandoned).
    """

    def __init__(self, *, nice: int = 0, idle_class: bool = False, name: str = "dealer-gen") -> None:
        if not isinstance(nice, int) or not 0 <= nice <= 19:
            raise ValueError(f"nice must be an int in 0..19, got {nice!r}")
        self.nice = nice
        self.idle_class = idle_class
        self.name = name
        self._lock = threading.Lock()  # one job at a time
        self._proc: Any = None
        self._conn: Connection | None = None
        self._stopped = False
        self.restarts = 0

    def start(self) -> None:
        """Spawn the process (idempotent): it imports what it needs in the background,
        so its start-up cost is paid before the first job."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> None:
        if self._stopped:
            raise GenerationError(f"{self.name} is stopped")
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._proc is not None:
            self._close()
            self.restarts += 1
        # a fresh interpreter (not multiprocessing's spawn, which re-imports the caller's
        # __main__): the worker holds only its end of a socket pair, so it sees EOF and
        # exits when the dealer's end closes, whether the dealer stopped or died
        ours, theirs = socket.socketpair()
        try:
            entry = "from secureinfer.dealer.generation import _main; _main()"
            self._proc = subprocess.Popen([sys.executable, "-c", entry, str(theirs.fileno())],
                                          pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        if self.nice and hasattr(os, "setpriority"):  # at once, so the worker's start-up yields too
            try:
                os.setpriority(os.PRIO_PROCESS, self._proc.pid,
                               min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.nice))
            except OSError:
                pass
        if self.idle_class and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
            try:  # Linux SCHED_IDLE: runs only on a CPU nothing else wants (see the module docstring)
                os.sched_setscheduler(self._proc.pid, os.SCHED_IDLE, os.sched_param(0))
            except OSError:
                pass
        self._conn = Connection(ours.detach())

    def generate(self, spec: ModelSpec, *, batch: int, purpose: str, timeout_s: float = 600.0) -> list[bytes]:
        """Every party's serialized part of one fresh set, generated in the worker."""
        with self._lock:
            self._ensure()
            conn = self._conn
            if conn is None:  # not reached: _ensure sets it or raises
                raise GenerationError(f"{self.name} has no connection")
            try:
                conn.send((spec, batch, purpose))
                if not conn.poll(timeout_s):
                    self._close()
                    raise GenerationError(f"{self.name}: no set after {timeout_s:g} s; worker restarted")
                status, value = conn.recv()
                if status == "ok":
                    value = [conn.recv_bytes() for _ in range(int(value))]
            except (EOFError, OSError) as e:
                self._close()
                raise GenerationError(f"{self.name} died generating a set ({type(e).__name__}); "
                                      "it is restarted for the next one") from None
        if status != "ok":
            raise GenerationError(f"{self.name}: {value}")
        return list(value)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
            self._proc = None

    @property
    def pid(self) -> int | None:
        """The worker's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def stop(self) -> None:
        """End the worker process; later calls raise :class:`GenerationError`."""
        self._stopped = True
        if self._lock.acquire(timeout=1.0):
            try:
                self._close()
            finally:
                self._lock.release()
        else:  # a job is under way: end the process under it (its caller sees EOF)
            proc = self._proc
            if proc is not None and proc.poll() is None:
                proc.terminate()
