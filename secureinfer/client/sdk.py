"""Client and model-owner SDK.

``Client(config).infer(name, x)`` encodes ``x`` in fixed point, splits it into additive
shares with the CSPRNG, sends one share to each party, collects the output shares and
reconstructs them — only the client ever sees the output. ``deploy(module, example, ...)``
is the owner's side: import the model, encode and share its weights, and send each party
only its share.

A :class:`Client` may be shared by any number of threads (see its docstring).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from secureinfer import ring
from secureinfer.config import Topology, load_topology
from secureinfer.engine.runner import encode_params
from secureinfer.errors import InvalidArgumentError, PeerUnavailableError, SecureInferError, ShapeError
from secureinfer.graph.ir import Graph
from secureinfer.graph.ranges import DEFAULT_MARGIN_BITS, calibrate_ranges
from secureinfer.prg import Prg
from secureinfer.sharing import reconstruct, share_seeded
from secureinfer.transport import tls
from secureinfer.transport.codec import seeded_share_to_proto, share_from_proto, split_chunks, tensor_to_proto
from secureinfer.v1 import common_pb2, party_pb2, party_pb2_grpc

__all__ = ["Client", "InferenceCost", "deploy", "deploy_graph", "one_hot"]


@dataclass(frozen=True)
class InferenceCost:
    """What one request cost: measured at the client and reported by every party."""

    latency_ms: float
    rounds: int
    bytes_online: int  # party-to-party bytes, all parties together
    bytes_offline: int  # dealer-to-party bytes, all parties together
    bytes_client_up: int
    bytes_client_down: int
    party_latency_ms: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "latency_ms": round(self.latency_ms, 3), "rounds": self.rounds, "bytes_online": self.bytes_online,
            "bytes_offline": self.bytes_offline, "bytes_client_up": self.bytes_client_up,
            "bytes_client_down": self.bytes_client_down,
        }


def _topology(config: str | Path | Topology) -> Topology:
    return config if isinstance(config, Topology) else load_topology(config)


def _telling(e: SecureInferError) -> int:
    """Rank of a party's error for the client (lowest raised): a dead party's UNAVAILABLE,
    then a party's own refusal (bad input, a limit, the dealer's answer), last the echoes
    of another party's abort ("aborted by party N"), which only repeat the cause."""
    text = str(e)
    if "aborted by party" in text:
        return 2
    return 0 if "unavailable" in text.lower() or e.grpc_code == "UNAVAILABLE" else 1


class _Cluster:
    """Channels from one identity to every party (mTLS), shared by SDK calls.

    Thread-safe: gRPC channels are, and :meth:`call_all` gives every call its own
    threads. (A shared, bounded pool would deadlock concurrent calls: with two workers,
    two requests can each occupy one worker with their party-0 RPC, and each party 0
    then waits for a party 1 that never receives its half of the request.)
    """

    def __init__(self, config: str | Path | Topology, identity: str) -> None:
        self.topology = _topology(config)
        self.ident = self.topology.identity(identity)
        st = self.topology.cluster
        self.metadata = () if st.tls else tls.insecure_identity_metadata(self.ident.name, self.ident.role)
        self.channels = [
            tls.open_channel(p.address, settings=st, cert=self.ident.cert, key=self.ident.key)
            for p in self.topology.parties
        ]

    def connect(self, timeout: float) -> None:
        """Open every channel now (TCP + TLS handshake); raise PeerUnavailableError naming
        the parties not reached within ``timeout`` seconds."""
        futs = [grpc.channel_ready_future(ch) for ch in self.channels]
        deadline = time.monotonic() + timeout
        missing = []
        for i, f in enumerate(futs):
            try:
                f.result(timeout=max(0.0, deadline - time.monotonic()))
            except grpc.FutureTimeoutError:
                f.cancel()
                missing.append(f"party {i} at {self.topology.party(i).address}")
        if missing:
            raise PeerUnavailableError(f"not connected within {timeout:g} s: {', '.join(missing)}")

    def call_all(self, fn: Any) -> list[Any]:
        """Run ``fn(party_id, channel)`` on every party concurrently; raise the clearest error.

        Each call runs on threads of its own, so that concurrent calls from several
        threads never wait for each other's RPCs (see the class docstring).
        """
        results, errors = [], []
        with ThreadPoolExecutor(max_workers=len(self.channels), thread_name_prefix="si-client") as pool:
            futs = [pool.submit(fn, i, ch) for i, ch in enumerate(self.channels)]
            for i, f in enumerate(futs):
                try:
                    results.append(f.result())
                except grpc.RpcError as err:
                    addr = self.topology.party(i).address
                    errors.append(tls.error_from_rpc_error(err, peer=f"party {i} at {addr}"))
                except SecureInferError as exc:
                    errors.append(exc)
        if errors:
            errors.sort(key=_telling)
            raise errors[0]
        return results

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


class Client:
    """Secure inference against a deployed model (role ``client``).

    >>> with Client("parties/local.toml") as c:
    ...     y = c.infer("digits", x)      # numpy logits; c.last_cost has the request's cost

    **Threads.** One client may be shared by any number of threads calling :meth:`infer`
    and :meth:`metadata` concurrently: the gRPC channels are thread-safe, each call runs
    its party RPCs on threads of its own, and the CSPRNG that splits inputs into shares
    (one AES-CTR stream, :class:`~secureinfer.prg.Prg`, which is not thread-safe) is only
    drawn from under a lock. :attr:`last_cost` and :attr:`last_info` are per thread: each
    thread sees the cost of the last request *it* made. Call :meth:`close` once, after
    every thread is done.
    """

    def __init__(self, config: str | Path | Topology, *, identity: str = "client", timeout: float | None = None) -> None:
        self._c = _Cluster(config, identity)
        self.topology = self._c.topology
        self.timeout = timeout or self.topology.cluster.request_timeout_s
        self._last = threading.local()  # last_cost / last_info of the calling thread
        self._prg = Prg.from_os()
        self._prg_lock = threading.Lock()  # the AES-CTR context must never be entered by two threads

    @property
    def last_cost(self) -> InferenceCost | None:
        """Cost of the last request the calling thread made with this client (None before)."""
        return getattr(self._last, "cost", None)

    @property
    def last_info(self) -> dict[str, str]:
        """Per-request facts the parties reported for the calling thread's last request,
        e.g. ``dp.epsilon_spent`` / ``dp.epsilon_remaining`` (empty before)."""
        return getattr(self._last, "info", {})

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._c.close()

    def connect(self, *, timeout: float | None = None) -> "Client":
        """Connect to every party now instead of on the first request (the TCP and TLS
        handshakes cost the first request tens of ms otherwise); raises
        :class:`~secureinfer.errors.PeerUnavailableError` naming each party not reached
        within ``timeout`` (default: the request timeout). Returns the client."""
        self._c.connect(self.timeout if timeout is None else timeout)
        return self

    def metadata(self, name: str, *, version: str = "") -> common_pb2.ModelMetadataResponse:
        req = common_pb2.ModelMetadataRequest(name=name, version=version)
        return self._c.call_all(
            lambda i, ch: party_pb2_grpc.InferenceStub(ch).ModelMetadata(req, timeout=self.timeout, metadata=self._c.metadata)
        )[0]

    def infer(
        self, name: str, x: np.ndarray | torch.Tensor | Sequence[Any], *, version: str = "",
        outputs: Sequence[str] = ("logits",), frac_bits: int | None = None,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Secure inference of ``x`` (batch first). Returns the logits, or a dict if several outputs.

        ``outputs``: ``"logits"`` (the model's output), ``"argmax"`` (its one-hot argmax,
        int64), ``"label"`` (a classifier's class label, int64: models imported with class
        labels, e.g. scikit-learn pipelines through ONNX), or the model's own output names
        where its graph declares them (an skl2onnx file's ``"output_label"``,
        ``"output_probability"``: probabilities come as a (batch, classes) array, not
        ZipMap's list of dicts)."""
        t0 = time.perf_counter()
        arr = torch.as_tensor(np.asarray(x))
        if not (arr.is_floating_point() or arr.dtype in (torch.int32, torch.int64, torch.uint8)):
            raise ShapeError(f"input must be a numeric array, got dtype {arr.dtype}")
        f = frac_bits if frac_bits is not None else self.topology.cluster.frac_bits
        enc = ring.encode(arr.to(torch.float64), frac_bits=f)
        with self._prg_lock:
            first, seeds = share_seeded(enc, self.topology.n_parties, prg=self._prg)
        rid = uuid.uuid4().hex
        inputs = [tensor_to_proto(first, encoding=common_pb2.ENCODING_ADDITIVE_SHARE, frac_bits=f),
                  *(seeded_share_to_proto(s, enc.shape, frac_bits=f) for s in seeds)]  # 32 bytes each
        reqs = [
            party_pb2.InferRequest(model_name=name, model_version=version, request_id=rid,
                                   outputs=list(outputs), input=t)
            for t in inputs
        ]
        resps: list[party_pb2.InferResponse] = self._c.call_all(
            lambda i, ch: party_pb2_grpc.InferenceStub(ch).Infer(reqs[i], timeout=self.timeout, metadata=self._c.metadata)
        )
        info = dict(resps[0].info)
        out: dict[str, np.ndarray] = {}
        for oname in outputs:
            parts, frac = [], None
            for r in resps:
                nt = next((t for t in r.outputs if t.name == oname), None)
                if nt is None:
                    raise SecureInferError(f"party {r.party_id} returned no output {oname!r}")
                parts.append(share_from_proto(nt.tensor))
                frac = nt.tensor.frac_bits
            value = reconstruct(parts)
            # no fractional bits: an integer output (argmax one-hot, a class label)
            out[oname] = (value.numpy().astype(np.int64) if not frac
                          else ring.decode(value, frac_bits=int(frac)).numpy())
        cost = InferenceCost(
            latency_ms=(time.perf_counter() - t0) * 1e3,
            rounds=max(r.cost.rounds for r in resps),
            bytes_online=sum(r.cost.bytes_sent_online for r in resps),
            bytes_offline=sum(r.cost.bytes_offline for r in resps),
            bytes_client_up=sum(q.ByteSize() for q in reqs),
            bytes_client_down=sum(r.ByteSize() for r in resps),
            party_latency_ms=tuple(r.cost.latency_ms for r in resps),
        )
        self._last.cost, self._last.info = cost, info
        return out[outputs[0]] if len(outputs) == 1 else out


def one_hot(ids: np.ndarray | torch.Tensor | Sequence[Any], vocab: int) -> np.ndarray:
    """Token ids (integers in ``[0, vocab)``, batch first) as the one-hot rows a model with a
    token-id input takes: shape ``(*ids.shape, vocab)``, float32 0/1. The ids stay secret:
    the rows are secret-shared like any input, and the model multiplies them by its table."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise ShapeError(f"token ids must be integers, got dtype {arr.dtype}")
    if not isinstance(vocab, int) or vocab < 2:
        raise InvalidArgumentError(f"vocab must be an int >= 2, got {vocab!r}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab):
        raise InvalidArgumentError(f"token ids must be in [0, {vocab}), got {int(arr.min())}..{int(arr.max())}")
    out = np.zeros((*arr.shape, vocab), dtype=np.float32)
    np.put_along_axis(out, arr[..., None].astype(np.int64), 1.0, axis=-1)
    return out


def deploy_graph(
    graph: Graph, *, name: str, config: str | Path | Topology, version: str = "", replace: bool = False,
    identity: str = "owner", parameters: dict[str, str] | None = None,
    calibration: np.ndarray | torch.Tensor | None = None, range_margin_bits: int = DEFAULT_MARGIN_BITS,
) -> party_pb2.DeployResponse:
    """Encode, share and send a model graph with parameters to every party (role ``owner``).

    ``parameters`` are public deployment settings, e.g. a DP policy
    (``{"dp.epsilon": "1", "dp.clip": "8", "dp.budget_epsilon": "20"}``; see
    :mod:`secureinfer.party.dp`). ``calibration``: representative inputs (a batch) from
    which every ReLU's comparison range is set to ``2^range_margin_bits`` times the
    largest value seen there (:func:`secureinfer.graph.ranges.calibrate_ranges`: fewer
    DCF levels and key bytes; inputs beyond that range break that ReLU, see its failure
    bound). Without it every ReLU admits real magnitudes below 2^15.
    """
    if calibration is not None:
        if isinstance(calibration, torch.Tensor):
            calibration = calibration.detach().cpu().numpy()
        graph = calibrate_ranges(graph, calibration, margin_bits=range_margin_bits)
    c = _Cluster(config, identity)
    try:
        n = c.topology.n_parties
        enc = encode_params(graph)
        prg = Prg.from_os()
        per_party: list[party_pb2.WeightShares] = [party_pb2.WeightShares() for _ in range(n)]
        for pname, value in enc.items():
            first, seeds = share_seeded(value, n, prg=prg)
            per_party[0].tensors.add(name=pname, tensor=tensor_to_proto(first, encoding=common_pb2.ENCODING_ADDITIVE_SHARE,
                                                                    frac_bits=graph.frac_bits))
            for i, seed in enumerate(seeds, start=1):
                per_party[i].tensors.add(name=pname, tensor=seeded_share_to_proto(seed, value.shape, frac_bits=graph.frac_bits))
        deployment_id = uuid.uuid4().hex
        chunk = c.topology.cluster.chunk_bytes
        gjson = graph.public_json()
        timeout = c.topology.cluster.request_timeout_s

        def send(i: int, ch: grpc.Channel) -> party_pb2.DeployResponse:
            data = per_party[i].SerializeToString()
            header = party_pb2.DeployHeader(name=name, version=version, deployment_id=deployment_id, replace=replace,
                                            graph=gjson, total_bytes=len(data),
                                            parameters={k: str(v) for k, v in (parameters or {}).items()})
            msgs = [party_pb2.DeployChunk(header=header)] + [party_pb2.DeployChunk(data=p) for p in split_chunks(data, chunk)]
            return party_pb2_grpc.ModelAdminStub(ch).Deploy(iter(msgs), timeout=timeout, metadata=c.metadata)

        return c.call_all(send)[0]
    finally:
        c.close()


def deploy(
    module: torch.nn.Module, example_input: torch.Tensor | Sequence[int], *, name: str,
    config: str | Path | Topology, version: str = "", replace: bool = False, identity: str = "owner",
    frac_bits: int | None = None, parameters: dict[str, str] | None = None,
    calibration: np.ndarray | torch.Tensor | None = None, range_margin_bits: int = DEFAULT_MARGIN_BITS,
) -> party_pb2.DeployResponse:
    """Import a PyTorch model and deploy it as secret shares (see :func:`deploy_graph`)."""
    from secureinfer.graph.torch_import import from_torch

    topo = _topology(config)
    graph = from_torch(module.eval(), example_input, frac_bits=frac_bits or topo.cluster.frac_bits)
    return deploy_graph(graph, name=name, config=topo, version=version, replace=replace, identity=identity,
                        parameters=parameters, calibration=calibration, range_margin_bits=range_margin_bits)
