"""A deploy that returns warm: the party side of pre-warming a deployment (mixed into
:class:`~secureinfer.party.server.PartyServer`).

After a deploy every party waits until it holds material for the pre-warmed kinds
(batch 1 and ``pool.batches``), runs each kind once with the other parties on an
all-zero input (the *warm-up*, decided by party 0 for all), and waits until its cache and
the dealer's pools of the deployment are full -- all bounded, see
:meth:`Prewarm._await_prewarm`. Why: the first request of a model otherwise pays one-time
costs (first calls of its code paths; 12.5 ms of party CPU vs 4-5 ms warm for an MLP
batch-1 request) and competes with the fill that follows a deploy.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import grpc
import torch

from secureinfer.config import MAX_BATCH
from secureinfer.dealer.core import BINDER
from secureinfer.engine.runner import run_plan
from secureinfer.errors import SecureInferError
from secureinfer.party.limits import prewarm_batches
from secureinfer.protocols.session import Session
from secureinfer.v1 import dealer_pb2

if TYPE_CHECKING:
    from secureinfer.party.server import LoadedModel

__all__ = ["Prewarm"]

#: how long a deploy without ``pool.batches`` waits for its first batch-1 set (longer
#: while the dealer is still generating it)
_PREWARM_BATCH1_S = 3.0
#: the protocol step of party 0's decision on a deploy's warm-up (session "warmup/<deployment>")
_WARMUP_STEP = 2**32 - 2


class Prewarm:
    """The pre-warm steps; the server provides ``cache``, ``transport``, ``dealer``,
    ``settings``, ``topology``, ``log``, ``party_id``, ``n`` and ``material``."""

    cache: Any
    transport: Any
    dealer: Any
    settings: Any
    topology: Any
    log: Any
    party_id: int
    n: int

    def material(self, lm: LoadedModel, session: Session, batch: int, purpose: str, *, warm_up: bool = False) -> Any:
        raise NotImplementedError

    @staticmethod
    def _prewarm_keys(lm: LoadedModel) -> list[tuple[str, int, str]]:
        """Material kinds pooled from load time on: batch 1 and every ``pool.batches`` size."""
        batches = prewarm_batches(lm.record.parameters, max_batch=MAX_BATCH)
        return [(lm.record.deployment_id, b, lm.default_purpose) for b in dict.fromkeys([1, *batches])]

    def _await_prewarm(self, lm: LoadedModel) -> None:
        """After a deploy: return once this party holds material for batch 1 and every size
        in ``pool.batches`` (so the first such request makes no dealer call), or after a
        bound: half the request timeout with ``pool.batches``, else ``_PREWARM_BATCH1_S``
        or, while the dealer still generates the deployment's sets, up to half the request
        timeout (a set too large for the pool never arrives; then the first request waits
        for generation). Then run each kind once (:meth:`_warm_up`) and, for at most twice the
        wait so far + 1 s more, wait until the cache holds its full depth of those kinds (the
        burst stock of small kinds included, :meth:`MaterialCache.kind_depth`) with no
        prefetch in flight, and then, within the first bound, until the dealer's pools of
        the deployment are full. No wait when the dealer or this party does not pool at all."""
        # the data streams to the peers too: a first request would otherwise pay the
        # handshakes (measured: the cluster's first MLP batch-1 request at 2.1x a warm one)
        unreached = self.transport.connect_peers(timeout=min(5.0, self.settings.rpc_timeout_s))
        if unreached:
            self.log.warning("peers_not_reached", peers=",".join(str(p) for p in unreached))
        if self.topology.dealer.pool_size <= 0 or self.cache.depth <= 0:
            return
        keys = self._prewarm_keys(lm)
        half = self.settings.request_timeout_s / 2
        bound = half if len(keys) > 1 else min(_PREWARM_BATCH1_S, half)
        t0 = time.monotonic()
        ready = self.cache.wait_ready(keys, timeout=bound)
        dep = lm.record.deployment_id
        while not ready and time.monotonic() - t0 < half and self._dealer_pending(dep):
            # past the bound but the dealer is still generating this deployment's sets (a
            # BERT-tiny batch-1 set, 790 MB, takes longer than 3 s): keep waiting, to half
            # the request timeout; a set the dealer will not make (too large) ends the wait
            ready = self.cache.wait_ready(keys, timeout=min(0.5, half - (time.monotonic() - t0)))
            bound = half
        waited = time.monotonic() - t0
        # the warm-up consumes a set per kind: only worth it when its replacement can be
        # waited for too (after a first set that took longer than a quarter of the request
        # timeout, the first request would wait for generation instead). Party 0 decides
        # for all (the parties' waits differ a little): every party runs it, or none.
        if self._warm_up_agreed(dep, run=ready and 2 * waited < half, timeout=max(1.0, half - waited)):
            self._warm_up(lm, keys, deadline=time.monotonic() + self.settings.request_timeout_s / 4)
        else:
            self.log.info("warmup_skipped", deployment=dep, ready=ready, first_set_ms=round(waited * 1e3))
        # then let the cache fill to its depth: a prefetch still running when the first
        # request arrives would compete with it for the CPU (first request 3-4x a warm one).
        # Bounded by twice the first set's wait + 1 s: a byte cap may stop the cache short.
        first = time.monotonic() - t0
        settled = ready and self.cache.wait_ready(keys, timeout=max(0.0, min(max(bound, 2 * waited + 1.0) - first,
                                                                             2 * first + 1.0)), depth=None)
        # and until the dealer's pools of this deployment are full: its deep fill beside the
        # first request took 10-100 ms of CPU in the gaps between that request's rounds
        # (first request 1.3-2.4x a warm one in the runs before this wait)
        pools_full = settled and self._await_dealer_pools(lm.record.deployment_id,
                                                          timeout=max(0.0, bound - (time.monotonic() - t0)))
        self.log.info("prewarm", deployment=lm.record.deployment_id, batches=",".join(str(k[1]) for k in keys),
                      ready=ready, settled=settled, dealer_pools_full=pools_full,
                      wait_ms=round((time.monotonic() - t0) * 1e3))

    def _warm_up_agreed(self, dep: str, *, run: bool, timeout: float) -> bool:
        """Party 0's decision on the deploy's warm-up, sent to every peer (its own ``run``);
        a peer that hears nothing within ``timeout`` skips it."""
        sid = f"warmup/{dep}"
        try:
            if self.party_id == BINDER:
                for p in range(1, self.n):
                    self.transport.send(sid, _WARMUP_STEP, p, b"1" if run else b"0", timeout=self.settings.rpc_timeout_s)
                return run
            return self.transport.recv(sid, _WARMUP_STEP, BINDER, timeout=timeout) == b"1"
        except SecureInferError as exc:
            self.log.warning("warmup_not_agreed", deployment=dep, error=str(exc))
            return False
        finally:
            self.transport.close_session(sid)

    def _warm_up(self, lm: LoadedModel, keys: list[tuple[str, int, str]], *, deadline: float) -> None:
        """Run each pre-warmed kind once on an all-zero input, every party at once (they all
        serve this deploy), and discard the output shares: the model's first request
        otherwise pays one-time costs (first calls of its code paths and kernel shapes, the
        seed-expansion manifest learned at a kind's first request). Measured on the
        cluster's first MLP batch-1 request: 12.5 ms party CPU vs 4-5 ms warm. Costs one
        material set per kind; opens only values masked by that set, like any request, and
        reveals nothing (the input is public zeros, the outputs are never combined). A
        failure is logged and leaves the deploy as it was."""
        spec = lm.graph.input_spec()
        for dep, batch, purpose in keys:
            sid = f"warmup/{dep}/{batch}/{purpose}"
            session = Session(party_id=self.party_id, n_parties=self.n, session_id=sid, transport=self.transport,
                              timeout=self.settings.rpc_timeout_s, deadline=deadline)
            t0 = time.perf_counter()
            try:
                with self.cache.serving():
                    bundle = self.material(lm, session, batch, purpose, warm_up=True)
                    learn = bundle.prepared and (batch, purpose) not in lm.expansions
                    if learn:
                        bundle.expansions = []
                    x = torch.zeros((batch, *spec.shape[1:]), dtype=torch.int64)
                    run_plan(session, lm.plan(batch, purpose, self.n), lm.model, bundle, x)
                    if learn and bundle.expansions is not None:
                        lm.expansions[(batch, purpose)] = bundle.expansions
            except Exception as exc:  # the model is deployed; its first request just runs cold
                self.transport.abort(sid, f"party {self.party_id}: warm-up failed: {exc}")
                self.log.warning("warmup_failed", deployment=dep, batch=batch, error=str(exc))
                return
            finally:
                self.transport.close_session(sid)
            self.log.info("warmup", deployment=dep, batch=batch, ms=round((time.perf_counter() - t0) * 1e3, 2))

    def _dealer_pending(self, deployment_id: str) -> int:
        """The dealer's ``deployment_pending`` for the deployment (0 if it cannot say)."""
        try:
            req = dealer_pb2.StatsRequest(deployment_id=deployment_id)
            return int(self.dealer.Stats(req, timeout=min(self.settings.rpc_timeout_s, 5.0)).counters.get(
                "deployment_pending", 0))
        except grpc.RpcError:
            return 0

    def _await_dealer_pools(self, deployment_id: str, *, timeout: float) -> bool:
        """Poll the dealer (``Stats`` with ``deployment_id``, every 50 ms) until it reports
        nothing pending for the deployment; False after ``timeout`` or if it cannot answer."""
        end = time.monotonic() + timeout
        req = dealer_pb2.StatsRequest(deployment_id=deployment_id)
        while True:
            try:
                counters = self.dealer.Stats(req, timeout=min(self.settings.rpc_timeout_s, 5.0)).counters
            except grpc.RpcError as err:
                self.log.warning("dealer_stats_failed", code=err.code().name)
                return False
            if counters.get("deployment_pending", 0) == 0:
                return "deployment_pending" in counters  # an older dealer does not report it
            if time.monotonic() + 0.05 > end:
                return False
            time.sleep(0.05)
