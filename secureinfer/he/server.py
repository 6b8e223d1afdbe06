"""``secureinfer he serve``: the gRPC HE inference server (mTLS, roles, health, chunking).

Serves ``secureinfer.v1.HEInference`` (see ``protos/secureinfer/v1/he.proto``) plus the
standard ``grpc.health.v1`` service on the ``[he]`` address of the topology, with the
``[he]`` certificate. Clients (role ``client``) may read metadata, open and close their
own sessions and infer; ``ServerLive``/``ServerReady`` answer any authenticated caller.
Message size limits come from ``cluster.max_message_bytes`` on both ends; context, keys
and ciphertexts travel in chunks of at most ``cluster.chunk_bytes``. The logic lives in
:class:`~secureinfer.he.service.HEService`; this module only speaks gRPC.

Every handler maps :class:`~secureinfer.errors.SecureInferError` to its status code with
:func:`~secureinfer.transport.tls.abort_with`; an unexpected exception becomes INTERNAL
with a generic message (and is logged without any payload).
"""

from __future__ import annotations

import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from secureinfer.config import ROLE_CLIENT, Topology
from secureinfer.errors import (
    ConfigError,
    DeadlineExceededError,
    InvalidArgumentError,
    ProtocolError,
    SecureInferError,
)
from secureinfer.he.model import HEModel, load_model
from secureinfer.he.params import MAX_COEFF_BITS_128
from secureinfer.he.service import INPUT_ENCODING, HEService, ServiceLimits, SessionLimitError
from secureinfer.he.wire import chunk_blobs, collect_blobs
from secureinfer.he.flooding import output_grid
from secureinfer.log import Logger
from secureinfer.transport.tls import abort_with, bind_server, peer_identity, require_role, server_options
from secureinfer.v1 import common_pb2, he_pb2, he_pb2_grpc
from secureinfer.sched import freeze_heap

__all__ = ["HEServer", "serve"]

T = TypeVar("T")


class _Servicer(he_pb2_grpc.HEInferenceServicer):
    def __init__(self, service: HEService, *, chunk_bytes: int, insecure: bool, log: Logger) -> None:
        self.service = service
        self.chunk_bytes = chunk_bytes
        self.insecure = insecure
        self.log = log

    def _guard(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except SecureInferError as exc:
            self.log.warning("request_failed", code=exc.grpc_code, error=str(exc)[:500])
            abort_with(context, exc)
        except Exception as exc:  # noqa: BLE001 - last resort: never leak internals or crash the server
            tb = traceback.extract_tb(exc.__traceback__)
            where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno} in {tb[-1].name}" if tb else "?"
            self.log.error("internal_error", error_type=type(exc).__name__, where=where)  # no message: may hold data
            context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")
        raise AssertionError("unreachable")  # pragma: no cover

    def _client(self, context: grpc.ServicerContext) -> str:
        return require_role(context, ROLE_CLIENT, insecure_metadata=self.insecure).name

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def run() -> Any:
            peer_identity(context, insecure_metadata=self.insecure)
            return common_pb2.ServerLiveResponse(live=True)
        return self._guard(context, run)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def run() -> Any:
            peer_identity(context, insecure_metadata=self.insecure)
            ready = bool(self.service.models)
            return common_pb2.ServerReadyResponse(ready=ready, reason="" if ready else "no model loaded")
        return self._guard(context, run)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def run() -> Any:
            self._client(context)
            m = self.service.model(request.name)
            rec = m.recommended
            shape_in = [-1, *m.model.input_shape]
            shape_out = [-1, *m.output_shape]
            sigma = self.service.limits.flood_sigma
            return he_pb2.HEModelMetadataResponse(
                model=common_pb2.ModelMetadataResponse(
                    name=m.name, versions=[m.version], platform="secureinfer-he-ckks",
                    inputs=[common_pb2.TensorMetadata(name="input", datatype=common_pb2.DTYPE_FLOAT64, shape=shape_in)],
                    outputs=[common_pb2.TensorMetadata(name="output", datatype=common_pb2.DTYPE_FLOAT64,
                                                       shape=shape_out)],
                    parameters={"scheme": "CKKS", "library": "TenSEAL/SEAL", "depth": str(m.depth)}),
                architecture_json=m.model.architecture_json(), depth=m.depth,
                recommended=he_pb2.CkksParameters(
                    poly_modulus_degree=rec.poly_modulus_degree, coeff_mod_bit_sizes=list(rec.coeff_mod_bit_sizes),
                    scale_bits=rec.scale_bits, depth=rec.depth,
                    security_bits=128 if rec.total_bits <= MAX_COEFF_BITS_128[rec.poly_modulus_degree] else 0),
                output_bound=m.output_bound, max_batch_pack=self.service.max_batch_pack(m),
                input_encoding=INPUT_ENCODING, flood_sigma=sigma, output_grid=output_grid(sigma))
        return self._guard(context, run)

    def OpenSession(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:  # noqa: N802
        def run() -> Any:
            owner = self._client(context)
            it = iter(request_iterator)
            first = next(it, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidArgumentError("OpenSession must start with a header")
            h = first.header
            limit = self.service.limits.max_session_bytes
            if h.context_bytes + h.galois_key_bytes > limit:
                raise SessionLimitError(f"session keys of {h.context_bytes + h.galois_key_bytes} bytes exceed {limit}")
            ctx, gk = bytearray(), bytearray()
            for msg in it:
                kind = msg.WhichOneof("part")
                if kind == "context":
                    ctx += msg.context
                elif kind == "galois_keys":
                    gk += msg.galois_keys
                else:
                    raise InvalidArgumentError("unexpected second header in OpenSession")
                if len(ctx) > h.context_bytes or len(gk) > h.galois_key_bytes:
                    raise InvalidArgumentError("more context/key bytes than the header announced")
            if len(ctx) != h.context_bytes or len(gk) != h.galois_key_bytes:
                raise ProtocolError("OpenSession stream ended before all announced bytes arrived")
            s = self.service.open_session(owner=owner, model_name=h.model_name, bp=int(h.batch_pack),
                                          scale_bits=int(h.scale_bits), context=bytes(ctx), galois_keys=bytes(gk),
                                          galois_steps=list(h.galois_steps))
            self.log.info("session_open", session=s.id, model=s.model.name, identity=owner, batch_pack=s.bp,
                          n=s.params.poly_modulus_degree, bytes=s.nbytes, sessions=self.service.n_sessions)
            return he_pb2.OpenSessionResponse(session_id=s.id, context_fingerprint=s.fingerprint,
                                              idle_timeout_s=self.service.limits.idle_timeout_s,
                                              depth=s.model.depth, n_input_ciphertexts=s.plan.input.n_ct)
        return self._guard(context, run)

    def CloseSession(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def run() -> Any:
            owner = self._client(context)
            return he_pb2.CloseSessionResponse(closed=self.service.close_session(request.session_id, owner=owner))
        return self._guard(context, run)

    def Infer(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        def run() -> list[Any]:
            t0 = time.perf_counter()
            owner = self._client(context)
            it = iter(request_iterator)
            first = next(it, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidArgumentError("Infer must start with a header")
            h = first.header
            s = self.service.session(h.session_id, owner=owner)
            if h.model_name and h.model_name != s.model.name:
                raise InvalidArgumentError(f"session {s.id} is for model {s.model.name!r}, not {h.model_name!r}")
            # refuse a wrong context, batch or count before reading any ciphertext
            self.service.check_request(s, batch_size=h.batch_size, fingerprint=h.context_fingerprint,
                                       n_ciphertexts=h.n_ciphertexts)

            def chunks() -> Iterator[Any]:
                for msg in it:
                    if msg.WhichOneof("part") != "ciphertext":
                        raise InvalidArgumentError("unexpected header after the first Infer message")
                    yield msg.ciphertext

            def check() -> None:
                if not context.is_active():
                    raise DeadlineExceededError("the client cancelled the request or its deadline passed")
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceededError("the request ran past its deadline")

            # at most limits.max_concurrent requests hold ciphertexts in memory at once
            with self.service.request_slot(timeout_s=context.time_remaining()):
                blobs = collect_blobs(chunks(), count=h.n_ciphertexts,
                                      max_bytes=self.service.max_ciphertext_bytes(s.params))
                bytes_in = sum(len(b) for b in blobs)
                out, stats = self.service.infer(s, batch_size=h.batch_size, fingerprint=h.context_fingerprint,
                                                blobs=blobs, check=check)
            msgs: list[Any] = [he_pb2.HEInferResponse(ciphertext=c) for c in chunk_blobs(out, self.chunk_bytes)]
            bytes_out = sum(len(b) for b in out)
            sigma = self.service.limits.flood_sigma
            ms = 1e3 * (time.perf_counter() - t0)
            msgs.append(he_pb2.HEInferResponse(result=he_pb2.HEInferResult(
                request_id=h.request_id, n_ciphertexts=len(out),
                cost=common_pb2.Cost(latency_ms=ms, rounds=1, bytes_sent_online=bytes_out,
                                     bytes_received_online=bytes_in),
                flood_sigma=sigma, output_grid=output_grid(sigma), stats=stats)))
            self.log.info("infer", session=s.id, request=h.request_id, batch=h.batch_size, ms=round(ms, 1),
                          evaluate_ms=round(stats["evaluate_ms"], 1), bytes_in=bytes_in, bytes_out=bytes_out)
            return msgs

        yield from self._guard(context, run)


@dataclass
class HEServer:
    """A running HE server: ``port``, ``service``; ``stop()`` shuts it down."""

    server: grpc.Server
    port: int
    service: HEService

    def stop(self, grace: float | None = 1.0) -> None:
        self.server.stop(grace).wait()
        self.service.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve(topology: Topology, *, models: Sequence[HEModel | str | Path], limits: ServiceLimits = ServiceLimits(),
          address: str | None = None, block: bool = True, max_workers: int = 8) -> HEServer:
    """Start the HE server of ``topology`` (``[he]`` table) serving ``models``.

    ``models`` are :class:`HEModel` objects or paths to ``.npz`` model files. With
    ``block`` the call serves until SIGINT/SIGTERM and then stops gracefully; otherwise it
    returns the running :class:`HEServer`.
    """
    if topology.he is None:
        raise ConfigError(f"{topology.path} has no [he] table (address and certificate of the HE server)")
    loaded = [m if isinstance(m, HEModel) else load_model(m) for m in models]
    if not loaded:
        raise ConfigError("no model to serve: pass --model FILE at least once")
    settings = topology.cluster
    log = Logger("he", identity=topology.he.name)
    service = HEService(loaded, limits=limits)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=server_options(settings))
    he_pb2_grpc.add_HEInferenceServicer_to_server(
        _Servicer(service, chunk_bytes=settings.chunk_bytes, insecure=not settings.tls, log=log), server)
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = bind_server(server, address or topology.he.address, settings=settings, cert=topology.he.cert,
                       key=topology.he.key)
    server.start()
    log.info("heap_frozen", objects=freeze_heap())  # start-up objects leave later collections
    for name in ("", "secureinfer.v1.HEInference"):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", address=address or topology.he.address, port=port, tls=settings.tls,
             models=[f"{m.name} (depth {sm.depth}, {sm.recommended.describe()})"
                     for m, sm in zip(loaded, service.models.values())])
    handle = HEServer(server, port, service)
    if not block:
        return handle
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        log.info("stopping")
        handle.stop()
    return handle
