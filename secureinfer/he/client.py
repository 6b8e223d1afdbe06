"""HE client SDK: ``HEClient(config).infer(name, x)`` — encrypt, send, decrypt.

For a model the client (1) reads the server's metadata (public architecture, depth,
output bound), (2) lowers the architecture itself and selects CKKS parameters locally
(:func:`~secureinfer.he.params.select_params`; it does not trust the server to propose
secure ones) or checks the parameters it was given — a model too deep for them is refused
*before any key or ciphertext is sent* — (3) plans the slot layout for the batch (the same
pure function the server runs), (4) opens a session with its public context and exactly
the Galois keys the plan needs (the secret key never leaves: see
:mod:`secureinfer.he.ckks`), (5) encrypts, streams ciphertexts, decrypts the result and
rounds it to the server's flooding grid.

Batches: ``B`` inputs are packed into batch packs of ``Bp = min(next_pow2(B), max)``
images (one slot group each); larger batches run as several requests in the same
session. Sessions are cached per (model, parameters, Bp) and reopened once if the server
has expired them. ``last_cost`` reports encrypt/evaluate/decrypt seconds, bytes up/down
and per-image amortised figures.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from secureinfer.config import ROLE_CLIENT, Topology, load_topology
from secureinfer.errors import (
    ConfigError,
    NotFoundError,
    ProtocolError,
    SecureInferError,
    ShapeError,
)
from secureinfer.he.ckks import ClientContext
from secureinfer.he.flooding import round_to_grid
from secureinfer.he.layout import LayoutPlan, plan_layout
from secureinfer.he.lower import Program, lower
from secureinfer.he.model import HEModel, validate
from secureinfer.he.packing import pack_inputs, unpack_outputs
from secureinfer.he.params import CkksParams, check_params, select_params
from secureinfer.he.wire import chunk_blobs, collect_blobs
from secureinfer.transport.tls import error_from_rpc_error, insecure_identity_metadata, open_channel
from secureinfer.v1 import common_pb2, he_pb2, he_pb2_grpc

__all__ = ["HEClient", "HECost", "HEModelInfo"]


@dataclass
class HECost:
    """What the last :meth:`HEClient.infer` cost (seconds, bytes; totals over the batch)."""

    batch: int = 0
    batch_pack: int = 0
    requests: int = 0
    encrypt_s: float = 0.0
    evaluate_s: float = 0.0  # server-side evaluation (as the server reports it)
    server_s: float = 0.0  # server-side total (load + evaluate + serialise)
    decrypt_s: float = 0.0
    total_s: float = 0.0
    bytes_up: int = 0  # ciphertexts (plus session keys when a session was opened)
    bytes_down: int = 0
    session_bytes: int = 0  # context + Galois keys sent by this call (0 if the session was reused)
    poly_modulus_degree: int = 0
    rotations: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        n = max(self.batch, 1)
        d.update({"encrypt_s_per_image": self.encrypt_s / n, "evaluate_s_per_image": self.evaluate_s / n,
                  "decrypt_s_per_image": self.decrypt_s / n, "total_s_per_image": self.total_s / n})
        return d


@dataclass(frozen=True)
class HEModelInfo:
    """The server's metadata for one model, plus what the client derived from it."""

    name: str
    architecture: HEModel
    program: Program  # structural lowering (public)
    depth: int
    output_bound: float
    max_batch_pack: int
    flood_sigma: float
    output_grid: float
    input_shape: tuple[int, ...]


@dataclass
class _Session:
    id: str
    fingerprint: str
    plan: LayoutPlan
    ctx: ClientContext


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


class HEClient:
    """Client of ``secureinfer he serve``.

    ``config`` is a topology file path or a loaded :class:`~secureinfer.config.Topology`;
    ``identity`` names the ``[[identity]]`` (role client) whose certificate is used.
    ``params`` fixes the CKKS parameters (default: selected per model); ``batch_pack``
    caps images per slot group; ``interceptors`` wrap the channel (tests use them to see
    the exact bytes sent); ``timeout_s`` is the deadline of each RPC (default
    ``cluster.request_timeout_s``). Not thread-safe: use one client per thread.
    """

    def __init__(self, config: str | os.PathLike[str] | Topology, *, identity: str = "client",
                 params: CkksParams | None = None, batch_pack: int | None = None,
                 interceptors: Sequence[grpc.UnaryUnaryClientInterceptor | grpc.StreamStreamClientInterceptor] = (),
                 timeout_s: float | None = None) -> None:
        topo = config if isinstance(config, Topology) else load_topology(Path(config))
        if topo.he is None:
            raise ConfigError(f"{topo.path} has no [he] table: no HE server to talk to")
        ident = topo.identity(identity)
        if ident.role != ROLE_CLIENT:
            raise ConfigError(f"identity {identity!r} has role {ident.role!r}; HE inference needs role client")
        self.topology = topo
        self.params = params
        self.batch_pack = batch_pack
        self.timeout_s = float(timeout_s if timeout_s is not None else topo.cluster.request_timeout_s)
        self._metadata = () if topo.cluster.tls else insecure_identity_metadata(ident.name, ident.role)
        channel = open_channel(topo.he.address, settings=topo.cluster, cert=ident.cert, key=ident.key)
        self._channel = channel
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self._stub = he_pb2_grpc.HEInferenceStub(channel)
        self._info: dict[str, HEModelInfo] = {}
        self._contexts: dict[CkksParams, ClientContext] = {}
        self._sessions: dict[tuple[str, CkksParams, int], _Session] = {}
        self.last_cost = HECost()

    # ------------------------------------------------------------------ plumbing

    def _call(self, fn: Any, request: Any) -> Any:
        try:
            return fn(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc_error(err, peer=f"HE server {self.topology.he.address}") from None  # type: ignore[union-attr]

    def close(self) -> None:
        for s in list(self._sessions.values()):
            try:
                self._call(self._stub.CloseSession, he_pb2.CloseSessionRequest(session_id=s.id))
            except SecureInferError:
                pass
        self._sessions.clear()
        for c in self._contexts.values():
            c.close()
        self._contexts.clear()
        self._channel.close()

    def __enter__(self) -> HEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def server_live(self, *, timeout_s: float | None = None) -> bool:
        """True if the server answers ServerLive (False if it cannot be reached)."""
        try:
            return bool(self._stub.ServerLive(common_pb2.ServerLiveRequest(), timeout=timeout_s or self.timeout_s,
                                              metadata=self._metadata).live)
        except grpc.RpcError:
            return False

    def server_ready(self) -> bool:
        return bool(self._call(self._stub.ServerReady, common_pb2.ServerReadyRequest()).ready)

    # ------------------------------------------------------------------ metadata

    def model_info(self, name: str) -> HEModelInfo:
        """Metadata of ``name`` (cached); validates the architecture locally."""
        if name not in self._info:
            md = self._call(self._stub.ModelMetadata, common_pb2.ModelMetadataRequest(name=name))
            arch = HEModel.from_architecture(md.architecture_json)
            validate(arch)
            program = lower(arch, structural=True)
            self._info[name] = HEModelInfo(
                name=name, architecture=arch, program=program, depth=max(program.depth, int(md.depth)),
                output_bound=float(md.output_bound) or 256.0, max_batch_pack=int(md.max_batch_pack) or 1,
                flood_sigma=float(md.flood_sigma), output_grid=float(md.output_grid),
                input_shape=tuple(arch.input_shape))
        return self._info[name]

    def params_for(self, name: str) -> CkksParams:
        """The CKKS parameters this client will use for ``name`` (checked against its depth)."""
        info = self.model_info(name)
        params = self.params or select_params(info.depth, output_bound=info.output_bound)
        check_params(params, depth=info.depth, output_bound=info.output_bound)
        return params

    # ------------------------------------------------------------------ sessions

    def _context(self, params: CkksParams) -> ClientContext:
        if params not in self._contexts:
            self._contexts[params] = ClientContext(params)
        return self._contexts[params]

    def _open(self, name: str, params: CkksParams, bp: int, cost: HECost) -> _Session:
        key = (name, params, bp)
        if key in self._sessions:
            return self._sessions[key]
        info = self.model_info(name)
        ctx = self._context(params)
        plan = plan_layout(info.program, slots=params.slots, bp=bp)
        steps = plan.galois_steps()
        context = ctx.public_context_bytes()
        gk = ctx.galois_key_bytes(steps)
        chunk = self.topology.cluster.chunk_bytes

        def stream() -> Iterator[he_pb2.OpenSessionChunk]:
            yield he_pb2.OpenSessionChunk(header=he_pb2.OpenSessionHeader(
                model_name=name, batch_pack=bp, scale_bits=params.scale_bits, context_bytes=len(context),
                galois_key_bytes=len(gk), galois_steps=steps))
            for off in range(0, len(context), chunk):
                yield he_pb2.OpenSessionChunk(context=context[off:off + chunk])
            for off in range(0, len(gk), chunk):
                yield he_pb2.OpenSessionChunk(galois_keys=gk[off:off + chunk])

        resp = self._call(self._stub.OpenSession, stream())
        if resp.context_fingerprint != ctx.fingerprint():
            raise ProtocolError("the server's context fingerprint does not match the context sent")
        cost.session_bytes += len(context) + len(gk)
        s = _Session(resp.session_id, resp.context_fingerprint, plan, ctx)
        self._sessions[key] = s
        return s

    # ------------------------------------------------------------------ inference

    def infer(self, name: str, x: np.ndarray) -> np.ndarray:
        """Encrypted inference of model ``name`` on ``x``: (B, *input_shape) -> (B, n_out).

        A single input of shape ``input_shape`` returns shape (n_out,).
        """
        t_start = time.perf_counter()
        info = self.model_info(name)
        params = self.params_for(name)  # refuses a too-deep model before anything is sent
        arr = np.asarray(x, dtype=np.float64)
        single = arr.shape == info.input_shape
        if single:
            arr = arr[None]
        if arr.ndim != len(info.input_shape) + 1 or tuple(arr.shape[1:]) != info.input_shape or arr.shape[0] < 1:
            raise ShapeError(f"input of shape {np.shape(x)}; expected (batch, {', '.join(map(str, info.input_shape))})")
        flat = arr.reshape(arr.shape[0], -1)
        cap = min(info.max_batch_pack, params.slots, self.batch_pack or params.slots)
        bp = min(_next_pow2(flat.shape[0]), 1 << (max(cap, 1).bit_length() - 1))
        cost = HECost(batch=flat.shape[0], batch_pack=bp, poly_modulus_degree=params.poly_modulus_degree)
        outs = []
        for start in range(0, flat.shape[0], bp):
            outs.append(self._infer_pack(name, params, bp, flat[start:start + bp], info, cost))
        y = np.concatenate(outs, axis=0)
        cost.bytes_up += cost.session_bytes
        cost.total_s = time.perf_counter() - t_start
        self.last_cost = cost
        return y[0] if single else y

    def _infer_pack(self, name: str, params: CkksParams, bp: int, batch: np.ndarray, info: HEModelInfo,
                    cost: HECost) -> np.ndarray:
        for attempt in (0, 1):
            s = self._open(name, params, bp, cost)
            try:
                return self._request(name, s, batch, info, cost)
            except NotFoundError:
                if attempt:
                    raise
                self._sessions.pop((name, params, bp), None)  # expired on the server: reopen once
        raise AssertionError("unreachable")  # pragma: no cover

    def _request(self, name: str, s: _Session, batch: np.ndarray, info: HEModelInfo, cost: HECost) -> np.ndarray:
        t0 = time.perf_counter()
        blobs = s.ctx.encrypt(pack_inputs(info.program, s.plan, batch))
        t1 = time.perf_counter()
        chunk = self.topology.cluster.chunk_bytes

        def stream() -> Iterator[he_pb2.HEInferRequest]:
            yield he_pb2.HEInferRequest(header=he_pb2.HEInferHeader(
                session_id=s.id, model_name=name, request_id=uuid.uuid4().hex, batch_size=batch.shape[0],
                n_ciphertexts=len(blobs), context_fingerprint=s.ctx.fingerprint()))
            for c in chunk_blobs(blobs, chunk):
                yield he_pb2.HEInferRequest(ciphertext=c)

        result: list[he_pb2.HEInferResult] = []

        def chunks() -> Iterator[he_pb2.CiphertextChunk]:
            try:
                for msg in self._stub.Infer(stream(), timeout=self.timeout_s, metadata=self._metadata):
                    if msg.WhichOneof("part") == "ciphertext":
                        yield msg.ciphertext
                    else:
                        result.append(msg.result)
            except grpc.RpcError as err:
                raise error_from_rpc_error(err, peer=f"HE server {self.topology.he.address}") from None  # type: ignore[union-attr]

        out_blobs = collect_blobs(chunks(), count=s.plan.output.n_ct,
                                  max_bytes=2 * s.ctx.params.poly_modulus_degree * len(s.ctx.params.coeff_mod_bit_sizes) * 8 + 4096)
        if not result:
            raise ProtocolError("the HE server sent no result message")
        t2 = time.perf_counter()
        y = unpack_outputs(s.plan, s.ctx.decrypt(out_blobs), batch.shape[0])
        y = round_to_grid(y, result[0].output_grid)
        t3 = time.perf_counter()
        stats = dict(result[0].stats)
        cost.requests += 1
        cost.encrypt_s += t1 - t0
        cost.evaluate_s += stats.get("evaluate_ms", 0.0) / 1e3
        cost.server_s += result[0].cost.latency_ms / 1e3
        cost.decrypt_s += t3 - t2
        cost.bytes_up += sum(len(b) for b in blobs)
        cost.bytes_down += sum(len(b) for b in out_blobs)
        cost.rotations += int(stats.get("rotations", 0))
        return y

    def __repr__(self) -> str:
        return f"HEClient({self.topology.he.address!r})"  # type: ignore[union-attr]
