"""One request's life in the router, as a state machine with one cleanup path.

    admission (router.admission) ──full──> OverloadedError (429)
    ROUTED ──reserve KV on decode D (routing.decode_order)──> RESERVED (ticket, lease held)
      ──prefill on P (routing.pick_prefill)──> PREFILLING ──first token──> STREAMING
      ──D's deltas until a finish reason──> FINISHED
    colocated: ROUTED ──worker W──> STREAMING ──> FINISHED
    a worker lost mid-way (actor died, KV transfer failed, the worker ended it) ──> MIGRATING:
      the attempt is dropped and a new one starts on live workers with the prompt plus every
      token already sent, so the client's stream goes on with no gap and no repeat
      (at most max_migrations; a failed KV transfer is retried once) ──> else FAILED (503)
    client left, stop string, or the caller stopped iterating ──> ABORTED

Every attempt has its own id on the workers (`<id>`, `<id>~1`, ...), so a dropped
attempt's leftovers can never meet the next one. Every ending goes through `_drop`: the
workers the attempt touched are told to abort (unless it finished) and the fleet's
counters are given back, which is what lets a draining worker leave.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

import ray

from engine.engine_loop import TokenDelta
from engine.errors import UnavailableError
from engine.sampling_params import SamplingParams
from kv_transfer.errors import KVTransferError
from kv_transfer.ticket import Ticket
from prefill_worker.worker import Prefilled
from router.outputs import Item, outputs_of
from router.placement import Role
from router.reserve import reserve
from router.router_state import Phase, Router, WorkerLost
from router.routing import (
    PrefillLoad,
    PrefillPolicy,
    block_hashes,
    pick_colocated,
    pick_prefill,
)
from router.trace import Trace
from router.workers import Worker

__all__ = ["Phase", "RequestLife", "Router", "WorkerLost"]


class RequestLife:
    def __init__(self, router: Router, rid: str, ids: list[int], params: SamplingParams):
        self.router, self.rid, self.ids, self.params = router, rid, ids, params
        self.phase = Phase.ROUTED
        self.attempt = 0
        self.attempt_rid = rid
        self.generated: list[int] = []  # tokens the client has been given
        self.ticket: Ticket | None = None
        self.prefill: Worker | None = None
        self.decode: Worker | None = None
        self._queued = 0  # prompt tokens counted on the prefill worker's queue
        self._finished = False  # a delta carried a finish reason
        self._transfer_failures = 0
        self._admitted_tokens = 0  # prompt tokens counted against the prefill admission bound
        colocated = router.fleet.config.colocated
        self.trace = Trace(rid, "colocated" if colocated else "disaggregated")

    async def run(self) -> AsyncIterator[TokenDelta]:
        self._admitted_tokens = self.router.admit(len(self.ids))
        self.trace.mark("routed", time.time())
        try:
            async with aclosing(self._attempts()) as attempts:
                async for delta in attempts:
                    delta.trace = self.trace  # the front end's tracker reads it (router.metrics)
                    self.generated.extend(delta.token_ids)
                    self._finished = self._finished or delta.finish_reason is not None
                    yield delta
        except (GeneratorExit, asyncio.CancelledError):
            self._drop(Phase.ABORTED)
            raise
        except BaseException:
            self._drop(Phase.FAILED)
            raise
        finally:
            self._drop(Phase.FINISHED if self._finished else Phase.ABORTED)
            self._leave_prefill_admission()
            self.router.leave()

    def _leave_prefill_admission(self) -> None:
        """The prompt's first prefill is done (or never will be): out of the prefill bound."""
        self.router.leave_prefill(self._admitted_tokens)
        self._admitted_tokens = 0

    # ---- attempts and migration -----------------------------------------------------------
    async def _attempts(self) -> AsyncGenerator[TokenDelta, None]:
        avoid: set[str] = set()  # workers this request has failed on
        while True:
            params = self._remaining_params()
            if params is None:  # the lost worker had produced every token asked for
                yield TokenDelta(self.rid, [], None, "length", len(self.ids), len(self.generated))
                return
            ids = self.ids + self.generated
            colocated = self.router.fleet.config.colocated
            stream = self._colocated(ids, params) if colocated else self._split(ids, params, avoid)
            try:
                async with aclosing(stream):
                    async for delta in stream:
                        yield self._rebase(delta)
                return
            except WorkerLost as lost:
                self._next_attempt(lost, avoid)

    def _next_attempt(self, lost: WorkerLost, avoid: set[str]) -> None:
        router = self.router
        self._drop(Phase.MIGRATING, lost.worker if lost.dead else None)
        avoid.add(lost.worker.name)
        if lost.dead:
            router.fleet.lost(lost.worker)
        else:
            router.fleet.suspect(lost.worker)
        self._transfer_failures += lost.transfer
        if self._transfer_failures > router.transfer_retries:
            raise UnavailableError(f"KV transfer failed on a retry too ({lost}); try again")
        if self.attempt >= router.max_migrations:
            raise UnavailableError(f"request lost {self.attempt + 1} workers ({lost}); try again")
        self.attempt += 1
        self.trace.attempts = self.attempt + 1
        self.attempt_rid = f"{self.rid}~{self.attempt}"
        router.stats.record(lost, resumed_tokens=len(self.generated))

    def _remaining_params(self) -> SamplingParams | None:
        left = self.params.max_tokens - len(self.generated)
        room = self.router.fleet.max_model_len - len(self.ids) - len(self.generated)
        if not self.generated:
            return self.params
        if left <= 0 or room <= 0:
            return None
        return dataclasses.replace(self.params, max_tokens=left)

    def _rebase(self, delta: TokenDelta) -> TokenDelta:
        """A delta of the current attempt, counted against the client's request."""
        delta.request_id = self.rid
        delta.num_prompt_tokens = len(self.ids)
        delta.num_output_tokens = len(self.generated) + len(delta.token_ids)
        return delta

    # ---- one attempt ---------------------------------------------------------------------
    async def _colocated(self, ids: list[int], params: SamplingParams):
        fleet, rng = self.router.fleet, self.router.rng
        workers = await fleet.wait_routable(Role.COLOCATED, self.router.reserve_timeout_s)
        if not workers:
            raise UnavailableError("no worker is active; try again later")
        by_name = {w.name: w for w in workers}
        name = pick_colocated([(w.name, w.in_flight) for w in workers], rng)
        worker = self.decode = by_name[name]
        fleet.enter(worker)
        self.trace.engine = worker.name
        self.phase = Phase.STREAMING
        queue = await outputs_of(worker).attach(self.attempt_rid, self.router.reserve_timeout_s)
        try:
            await worker.actor.submit.remote(self.attempt_rid, ids, params)
        except ray.exceptions.RayActorError as exc:
            raise WorkerLost.of(worker, "died at submit", exc) from None
        async for delta in self._relay(queue, worker):
            yield delta

    async def _split(self, ids: list[int], params: SamplingParams, avoid: set[str]):
        decode, ticket = await reserve(self, ids, params, avoid)
        # registered with no await since reserve; the stream open before D can make a delta
        queue = await outputs_of(decode).attach(self.attempt_rid, self.router.reserve_timeout_s)
        prefill = await self._pick_prefill(ids, avoid)
        self.phase = Phase.PREFILLING
        leases = self.router.leases
        leases.hold(decode, self.attempt_rid)
        self.trace.mark("prefill_sent", time.time())
        try:
            done = await prefill.actor.prefill.remote(self.attempt_rid, ids, params, ticket)
        except KVTransferError as exc:  # the prefill worker could not hand its KV to D
            raise WorkerLost(decode, f"KV transfer failed: {exc}", transfer=True) from None
        except ray.exceptions.RayActorError as exc:
            raise WorkerLost.of(prefill, "died during prefill", exc) from None
        except ray.exceptions.RayTaskError as exc:  # it ended the prompt on its own
            raise WorkerLost(prefill, f"prefill failed: {exc.cause!r}") from None
        finally:
            leases.drop(decode, self.attempt_rid)
        # its KV went to D and was released: the prefill worker is done with this request
        self._leave_prefill_admission()
        self.router.fleet.leave(prefill, self._queued)
        self.prefill, self._queued = None, 0
        self.phase = Phase.STREAMING
        self._trace_prefill(done, prefill, decode)
        first = done.token
        logprobs = [first] if params.logprobs is not None else None
        yield TokenDelta(self.rid, [first.token_id], logprobs, None, len(ids), 1)
        async for delta in self._relay(queue, decode):
            yield delta

    def _trace_prefill(self, done: Prefilled, prefill: Worker, decode: Worker) -> None:
        trace = self.trace
        trace.engine, trace.prefill = decode.name, prefill.name
        trace.kv_bytes += done.kv_bytes
        trace.kv_pages += done.kv_pages
        if not self.generated:  # the attempt that makes the first token owns TTFT's hops
            trace.mark("prefill_returned", time.time())
            trace.merge("p", done.marks)

    async def _pick_prefill(self, ids: list[int], avoid: set[str]) -> Worker:
        """The prefill worker for this prompt; its queue counts the tokens it must compute."""
        router = self.router
        found = await router.fleet.wait_routable(Role.PREFILL, router.reserve_timeout_s)
        workers = {w.name: w for w in found if w.name not in avoid} or {w.name: w for w in found}
        if not workers:
            raise UnavailableError("no prefill worker is active; try again later")
        bs = router.fleet.config.engine.block_size
        # only the prefix policy reads the index: other policies skip hashing the prompt
        hashes = block_hashes(ids, bs) if router.policy is PrefillPolicy.PREFIX else []
        cached = {n: bs * router.prefix_index.cached_blocks(n, hashes) for n in workers}
        loads = [PrefillLoad(n, w.queued_tokens, cached[n]) for n, w in workers.items()]
        name = pick_prefill(loads, len(ids), router.policy, router.rng)
        router.prefix_index.record(name, hashes)
        self.prefill = workers[name]
        self._queued = max(0, len(ids) - cached[name])  # the work it adds: what is not cached
        router.fleet.enter(self.prefill, self._queued)
        return self.prefill

    async def _relay(self, queue: asyncio.Queue[Item], worker: Worker) -> AsyncIterator[TokenDelta]:
        """This attempt's deltas from the worker's output stream, to its finish reason; a
        worker that dies or ends the request on its own (lease lost, engine error) is a lost
        worker, not the end."""
        while True:
            item = await queue.get()
            if isinstance(item, WorkerLost):
                raise item
            if item.marks is not None:  # the worker's first delta: its marks, once
                prefix = "w" if self.trace.mode == "colocated" else "d"
                if f"{prefix}_scheduled" not in self.trace.marks:
                    self.trace.merge(prefix, item.marks)
            if item.finish_reason in ("abort", "error"):
                dead = item.finish_reason == "error"  # its engine loop died
                raise WorkerLost(worker, f"ended the request ({item.finish_reason})", dead)
            yield item
            if item.finish_reason is not None:
                return

    # ---- the one cleanup -------------------------------------------------------------------
    def _drop(self, phase: Phase, dead: Worker | None = None) -> None:
        """End the current attempt: abort where not finished (not on a dead worker), give
        the fleet its counters back. Idempotent; `run` calls it on every exit."""
        if self.phase in (Phase.FINISHED, Phase.ABORTED, Phase.FAILED):
            return
        self.phase = phase
        if self.decode is not None:  # its output queue goes with the attempt
            outputs_of(self.decode).unregister(self.attempt_rid)
        for worker, tokens in ((self.prefill, self._queued), (self.decode, 0)):
            if worker is None:
                continue
            if not self._finished and worker is not dead:
                worker.actor.abort.remote(self.attempt_rid)
            self.router.fleet.leave(worker, tokens)
        self.prefill = self.decode = self.ticket = None
        self._queued = 0
