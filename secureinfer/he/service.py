"""The HE server's logic, independent of gRPC: models, bounded sessions, evaluation.

:class:`HEService` holds the served models and the open sessions. A session is one
client's public CKKS context (parameters + relinearisation keys) and Galois keys for one
(model, batch pack); it is bound to the identity that opened it and to the SHA-256
fingerprint of its context bytes.

Checks before anything is evaluated (each a clear error, never a crash):

* the context bytes carry no secret key (parsed on the wire bytes, then TenSEAL's
  ``is_private()`` after loading) — the server refuses to hold one;
* the parameters are 128-bit secure and deep enough for the model, and q0 holds the
  model's output bound (:func:`~secureinfer.he.params.check_params`);
* the Galois keys cover every rotation step of the layout plan;
* an Infer request names the session's context fingerprint (a ciphertext made under a
  different context is refused by name), its ciphertexts load under the session's SEAL
  context (SEAL validates parameters and coefficient ranges), are at the first level with
  the session's scale, and their count matches the plan.

Limits: at most ``max_sessions`` open sessions (expired ones are swept first; otherwise
RESOURCE_EXHAUSTED), at most ``max_concurrent`` requests holding ciphertexts at once
(others wait until their deadline), at most ``max_session_bytes`` of keys per session, sessions expire
after ``idle_timeout_s`` without use, ciphertexts larger than the parameters allow are
refused, and a plan may not need more than ``max_input_ciphertexts`` inputs.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from secureinfer.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    SecureInferError,
)
from secureinfer.he._sealio import SealIO
from secureinfer.he.ckks import context_fingerprint, context_has_secret_key, params_of_context
from secureinfer.he.engine import Evaluator, PlaintextCache
from secureinfer.he.layout import LayoutPlan, plan_layout
from secureinfer.he.lower import Program, SquareStep, lower
from secureinfer.he.model import HEModel, layer_shapes
from secureinfer.he.params import CkksParams, check_params, select_params
from secureinfer.prg import Prg

__all__ = ["HEService", "ServedModel", "Session", "SessionLimitError", "ServiceLimits"]

INPUT_ENCODING = (
    "CKKS slots: slot = position * batch_pack + image (batch_pack a power of two); features "
    "fill ciphertexts in order; a first conv2d layer may be im2col-expanded by the client "
    "(tap-major: feature = tap * n_windows + window) when the layout plan says so. The plan "
    "is computed by secureinfer.he.layout.plan_layout from the architecture, N and batch_pack."
)


class SessionLimitError(SecureInferError):
    """Too many open sessions, or a session's keys are too large."""

    grpc_code = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class ServiceLimits:
    max_sessions: int = 32
    max_session_bytes: int = 256 * 1024 * 1024
    idle_timeout_s: float = 600.0
    max_input_ciphertexts: int = 1024
    max_batch_pack: int = 32768
    flood_sigma: float = 0.0
    cache_bytes: int = 512 * 1024 * 1024
    max_concurrent: int = 2


@dataclass
class ServedModel:
    name: str
    version: str
    model: HEModel
    program: Program
    structure: Program
    recommended: CkksParams
    output_bound: float
    _plans: dict[tuple[int, int], LayoutPlan] = field(default_factory=dict)

    @classmethod
    def create(cls, model: HEModel, *, version: str = "1") -> ServedModel:
        program = lower(model)
        structure = lower(model, structural=True)
        bound = float(model.output_bound) if model.output_bound is not None else 256.0
        return cls(model.name, version, model, program, structure,
                   select_params(structure.depth, output_bound=bound), bound)

    @property
    def depth(self) -> int:
        return self.structure.depth

    def plan(self, slots: int, bp: int) -> LayoutPlan:
        key = (slots, bp)
        if key not in self._plans:
            self._plans[key] = plan_layout(self.structure, slots=slots, bp=bp)
        return self._plans[key]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return layer_shapes(self.model)[-1]


@dataclass
class Session:
    id: str
    owner: str
    model: ServedModel
    bp: int
    params: CkksParams
    fingerprint: str
    plan: LayoutPlan
    evaluator: Evaluator
    seal_context: Any
    nbytes: int
    last_used: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    keep: Any = None  # the TenSEAL context object (owns the SEAL context and keys)


class HEService:
    """Models and sessions of one HE server process (thread-safe)."""

    def __init__(self, models: Sequence[HEModel], *, limits: ServiceLimits = ServiceLimits(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.models: dict[str, ServedModel] = {}
        for m in models:
            if m.name in self.models:
                raise InvalidArgumentError(f"two models are named {m.name!r}")
            self.models[m.name] = ServedModel.create(m)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._io = SealIO()
        self._cache = PlaintextCache(limits.cache_bytes)
        self._prg = Prg.from_os()
        self._prg_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max(1, limits.max_concurrent))

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()
        self._io.close()

    @contextlib.contextmanager
    def request_slot(self, *, timeout_s: float | None) -> Iterator[None]:
        """Admission control: wait (up to the request's deadline) for one of ``max_concurrent`` slots."""
        if not self._slots.acquire(timeout=timeout_s if timeout_s is None or timeout_s > 0 else 0):
            raise DeadlineExceededError(f"the server is busy with {self.limits.max_concurrent} requests and the "
                                        "request's deadline passed while it waited")
        try:
            yield
        finally:
            self._slots.release()

    # ------------------------------------------------------------------ models

    def model(self, name: str) -> ServedModel:
        m = self.models.get(name)
        if m is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFoundError(f"no HE model named {name!r}; served: {known}")
        return m

    def max_batch_pack(self, m: ServedModel) -> int:
        """Largest power-of-two batch pack within the limits at the recommended N."""
        slots = m.recommended.slots
        bp = 1 << (min(self.limits.max_batch_pack, slots).bit_length() - 1)
        while bp > 1 and m.plan(slots, bp).input.n_ct > self.limits.max_input_ciphertexts:
            bp //= 2
        return bp

    # ------------------------------------------------------------------ sessions

    def _sweep(self, now: float) -> None:
        dead = [sid for sid, s in self._sessions.items() if now - s.last_used > self.limits.idle_timeout_s]
        for sid in dead:
            del self._sessions[sid]

    @property
    def n_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open_session(self, *, owner: str, model_name: str, bp: int, scale_bits: int, context: bytes,
                     galois_keys: bytes, galois_steps: Sequence[int]) -> Session:
        import tenseal as ts

        m = self.model(model_name)
        if len(context) + len(galois_keys) > self.limits.max_session_bytes:
            raise SessionLimitError(f"session keys of {len(context) + len(galois_keys)} bytes exceed the "
                                    f"limit of {self.limits.max_session_bytes}")
        with self._lock:
            self._sweep(self._clock())
            if len(self._sessions) >= self.limits.max_sessions:
                raise SessionLimitError(f"{len(self._sessions)} sessions are open (limit "
                                        f"{self.limits.max_sessions}); close one or retry later")
        if context_has_secret_key(context):
            raise InvalidArgumentError("the context carries a secret key; send a public context "
                                       "(serialize(save_secret_key=False)); the server refuses to hold one")
        try:
            ctx = ts.context_from(bytes(context))
        except Exception as exc:  # noqa: BLE001 - TenSEAL raises assorted types on bad bytes
            raise InvalidArgumentError(f"cannot load the CKKS context: {exc}") from None
        if ctx.is_private() or ctx.has_secret_key():
            raise InvalidArgumentError("the context carries a secret key; the server refuses to hold one")
        seal = ctx.data.seal_context()
        params = params_of_context(seal, scale_bits)
        check_params(params, depth=m.depth, output_bound=m.output_bound)
        slots = params.slots
        if bp < 1 or bp & (bp - 1) or bp > min(slots, self.limits.max_batch_pack):
            raise InvalidArgumentError(f"batch_pack must be a power of two <= {min(slots, self.limits.max_batch_pack)}, "
                                       f"got {bp}")
        plan = m.plan(slots, bp)
        if plan.input.n_ct > self.limits.max_input_ciphertexts:
            raise InvalidArgumentError(f"batch_pack {bp} needs {plan.input.n_ct} input ciphertexts "
                                       f"(limit {self.limits.max_input_ciphertexts}); use a smaller batch_pack")
        need = plan.galois_steps()
        missing = sorted(set(need) - {int(s) % slots for s in galois_steps})
        if missing:
            raise InvalidArgumentError(f"the Galois keys do not cover rotation steps {missing} the layout needs")
        gk = self._io.load_galois_keys(seal, galois_keys) if need else None
        if gk is not None:
            tool = seal.key_context_data().galois_tool()
            absent = [st for st in need if not gk.has_key(int(tool.get_elt_from_step(int(st))))]
            if absent:
                raise InvalidArgumentError(f"the Galois keys sent do not contain rotation steps {absent}")
        relin = ctx.data.relin_keys() if ctx.has_relin_keys() else None
        if relin is None and any(isinstance(st, SquareStep) for st in m.program.steps):
            raise InvalidArgumentError("the context has no relinearisation keys but the model squares")
        ev = Evaluator(program=m.program, plan=plan, seal_context=seal, relin_keys=relin, galois_keys=gk,
                       cache=self._cache, cache_key=(m.name, m.version))
        s = Session(id=uuid.uuid4().hex,  # session name, not a secret (the caller's identity guards it)
                    owner=owner, model=m, bp=bp, params=params, fingerprint=context_fingerprint(context),
                    plan=plan, evaluator=ev, seal_context=seal, nbytes=len(context) + len(galois_keys),
                    last_used=self._clock(), keep=(ctx, gk))
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                raise SessionLimitError(f"{len(self._sessions)} sessions are open (limit {self.limits.max_sessions})")
            self._sessions[s.id] = s
        return s

    def session(self, session_id: str, *, owner: str) -> Session:
        with self._lock:
            now = self._clock()
            self._sweep(now)
            s = self._sessions.get(session_id)
            if s is None:
                raise NotFoundError(f"no open HE session {session_id!r} (expired after "
                                    f"{self.limits.idle_timeout_s:g}s idle, closed, or never opened)")
            if s.owner != owner:
                raise PermissionDeniedError(f"session {session_id!r} belongs to another identity")
            s.last_used = now
            return s

    def close_session(self, session_id: str, *, owner: str) -> bool:
        self.session(session_id, owner=owner)
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    # ------------------------------------------------------------------ inference

    def max_ciphertext_bytes(self, params: CkksParams) -> int:
        """Upper bound on one serialised ciphertext (2 polys, all primes, 8 bytes, + header)."""
        return 2 * params.poly_modulus_degree * len(params.coeff_mod_bit_sizes) * 8 + 4096

    def check_request(self, s: Session, *, batch_size: int, fingerprint: str, n_ciphertexts: int) -> None:
        """Refuse a request before its ciphertexts are read: wrong context, batch or count."""
        if fingerprint != s.fingerprint:
            raise InvalidArgumentError(
                f"the ciphertexts were made under a different CKKS context (fingerprint {fingerprint[:12]}..., "
                f"session {s.id} has {s.fingerprint[:12]}...); open a session with that context"
            )
        if not 1 <= batch_size <= s.bp:
            raise InvalidArgumentError(f"batch_size {batch_size} must be in [1, {s.bp}] for this session")
        if n_ciphertexts != s.plan.input.n_ct:
            raise InvalidArgumentError(f"expected {s.plan.input.n_ct} input ciphertexts, got {n_ciphertexts}")

    def infer(self, s: Session, *, batch_size: int, fingerprint: str, blobs: Sequence[bytes],
              check: Callable[[], None] = lambda: None) -> tuple[list[bytes], dict[str, float]]:
        """Evaluate one request; returns serialised output ciphertexts and stats."""
        self.check_request(s, batch_size=batch_size, fingerprint=fingerprint, n_ciphertexts=len(blobs))
        t0 = time.perf_counter()
        first = s.seal_context.first_parms_id()
        scale = float(2 ** s.params.scale_bits)
        cts = []
        for i, b in enumerate(blobs):
            ct = self._io.load_ciphertext(s.seal_context, b)
            if list(ct.parms_id()) != list(first) or ct.size() != 2 or not ct.is_ntt_form():
                raise InvalidArgumentError(f"ciphertext {i} is not a fresh ciphertext at the first level")
            if abs(ct.scale - scale) > 1e-6 * scale:
                raise InvalidArgumentError(f"ciphertext {i} has scale {ct.scale:g}, the session uses 2^{s.params.scale_bits}")
            cts.append(ct)
        t1 = time.perf_counter()
        with s.lock:
            before = dict(s.evaluator.ops)
            outs = s.evaluator.run(cts, check=check)
            if self.limits.flood_sigma > 0:
                with self._prg_lock:
                    outs = s.evaluator.flood(outs, sigma=self.limits.flood_sigma, prg=self._prg)
            ops = {k: float(v - before.get(k, 0)) for k, v in s.evaluator.ops.items()}
        t2 = time.perf_counter()
        out = [self._io.dump(c) for c in outs]
        t3 = time.perf_counter()
        stats = {"load_ms": 1e3 * (t1 - t0), "evaluate_ms": 1e3 * (t2 - t1), "serialize_ms": 1e3 * (t3 - t2), **ops}
        return out, stats
