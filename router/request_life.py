"""One request's life in the router, as a state machine with one cleanup path.

    ROUTED ──reserve KV on decode D (routing.decode_order)──> RESERVED (ticket)
      ──prefill on P (routing.pick_prefill)──> PREFILLING ──first token──> STREAMING
      ──D's deltas until a finish reason──> FINISHED
    colocated: ROUTED ──worker W──> STREAMING ──> FINISHED
    client left, stop string, or the caller stopped iterating ──> ABORTED
    an error on any worker ──> FAILED

Every ending goes through `_end`: the workers it touched are told to abort (unless it
finished), and the fleet's counters are given back, which is what lets a draining
worker leave.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from engine.engine_loop import TokenDelta
from engine.errors import OverloadedError
from engine.sampling_params import SamplingParams
from kv_transfer.ticket import Ticket
from router.fleet import Fleet, Worker, WorkerState
from router.placement import Role
from router.routing import (
    DecodeLoad,
    PrefillLoad,
    PrefillPolicy,
    PrefixIndex,
    block_hashes,
    decode_order,
    pick_prefill,
)


class Phase(enum.Enum):
    ROUTED = "routed"
    RESERVED = "reserved"
    PREFILLING = "prefilling"
    STREAMING = "streaming"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass(slots=True)
class Router:
    """What every request's life shares: the fleet, the prefix index and the policy."""

    fleet: Fleet
    prefix_index: PrefixIndex
    policy: PrefillPolicy = PrefillPolicy.PREFIX
    reserve_timeout_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)


class RequestLife:
    def __init__(self, router: Router, rid: str, ids: list[int], params: SamplingParams):
        self.router, self.rid, self.ids, self.params = router, rid, ids, params
        self.phase = Phase.ROUTED
        self.ticket: Ticket | None = None
        self.prefill: Worker | None = None
        self.decode: Worker | None = None
        self.tokens_sent = 0
        self._queued = 0  # prompt tokens counted on the prefill worker's queue
        self._finished = False  # a delta carried a finish reason
        self._ended = False

    async def run(self) -> AsyncIterator[TokenDelta]:
        try:
            stream = self._colocated() if self.router.fleet.config.colocated else self._split()
            async with aclosing(stream):
                async for delta in stream:
                    self.tokens_sent += len(delta.token_ids)
                    self._finished = self._finished or delta.finish_reason is not None
                    yield delta
        except (GeneratorExit, asyncio.CancelledError):
            self._end(Phase.ABORTED)
            raise
        except BaseException:
            self._end(Phase.FAILED)
            raise
        finally:
            self._end(Phase.ABORTED)  # the stream ended without a finish reason

    async def _colocated(self) -> AsyncGenerator[TokenDelta, None]:
        workers = self.router.fleet.routable(Role.COLOCATED)
        if not workers:
            raise OverloadedError("no worker is active; try again later")
        rng = self.router.rng
        self.decode = min(workers, key=lambda w: (w.in_flight, rng.random()))
        self.router.fleet.enter(self.decode)
        self.phase = Phase.STREAMING
        actor = self.decode.actor
        stream = actor.generate.options(num_returns="streaming").remote(
            self.rid, self.ids, self.params
        )
        async for delta in _relay(stream):
            yield delta

    async def _split(self) -> AsyncGenerator[TokenDelta, None]:
        await self._reserve()
        assert self.decode is not None and self.ticket is not None
        stream = self.decode.actor.stream.options(num_returns="streaming").remote(self.rid)
        self.prefill, cached = self._pick_prefill()
        n = len(self.ids)
        self._queued = max(0, n - cached)  # the work it adds there: what is not cached
        self.router.fleet.enter(self.prefill, self._queued)
        self.phase = Phase.PREFILLING
        first = await self.prefill.actor.prefill.remote(
            self.rid, self.ids, self.params, self.ticket
        )
        # its KV went to D and was released: the prefill worker is done with this request
        self.router.fleet.leave(self.prefill, self._queued)
        self.prefill, self._queued = None, 0
        self.phase = Phase.STREAMING
        logprobs = [first] if self.params.logprobs is not None else None
        yield TokenDelta(self.rid, [first.token_id], logprobs, None, n, 1)
        async for delta in _relay(stream):
            yield delta

    async def _reserve(self) -> None:
        """KV on the decode worker with the most room; wait (bounded) while all are full."""
        fleet = self.router.fleet
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.router.reserve_timeout_s
        delay = 0.01
        while True:
            workers = {w.name: w for w in fleet.routable(Role.DECODE)}
            loads = [DecodeLoad(w.name, w.free_blocks, w.in_flight) for w in workers.values()]
            for name in decode_order(loads, self.router.rng):
                worker = workers[name]
                if worker.state is not WorkerState.ACTIVE:  # began draining while we awaited
                    continue
                ticket = await worker.actor.reserve.remote(self.rid, self.ids, self.params)
                if ticket is None:
                    worker.free_blocks = 0
                    continue
                worker.free_blocks = ticket.free_blocks
                if worker.state is not WorkerState.ACTIVE:  # draining now: give the KV back
                    worker.actor.abort.remote(self.rid)
                    continue
                self.decode, self.ticket, self.phase = worker, ticket, Phase.RESERVED
                fleet.enter(worker)
                return
            if loop.time() > deadline:
                raise OverloadedError("no decode worker has free KV blocks; try again later")
            await asyncio.sleep(delay)  # back-off while decodes finish and free blocks
            delay = min(delay * 2, 0.5)

    def _pick_prefill(self) -> tuple[Worker, int]:
        """The prefill worker for this prompt, and how many of its tokens it has cached."""
        router = self.router
        workers = {w.name: w for w in router.fleet.routable(Role.PREFILL)}
        if not workers:
            raise OverloadedError("no prefill worker is active; try again later")
        bs = router.fleet.config.engine.block_size
        # only the prefix policy reads the index: other policies skip hashing the prompt
        hashes = block_hashes(self.ids, bs) if router.policy is PrefillPolicy.PREFIX else []
        cached = {n: bs * router.prefix_index.cached_blocks(n, hashes) for n in workers}
        loads = [PrefillLoad(n, w.queued_tokens, cached[n]) for n, w in workers.items()]
        name = pick_prefill(loads, len(self.ids), router.policy, router.rng)
        router.prefix_index.record(name, hashes)
        return workers[name], cached[name]

    def _end(self, phase: Phase) -> None:
        """The one cleanup: abort where not finished, give the fleet its counters back."""
        if self._ended:
            return
        self._ended = True
        finished = self._finished
        self.phase = Phase.FINISHED if finished else phase
        for worker, tokens in ((self.prefill, self._queued), (self.decode, 0)):
            if worker is None:
                continue
            if not finished:
                worker.actor.abort.remote(self.rid)
            self.router.fleet.leave(worker, tokens)
        self.prefill = self.decode = None


async def _relay(stream) -> AsyncIterator[TokenDelta]:
    """Flatten a worker's streamed batches of deltas."""
    async for ref in stream:
        for delta in await ref:
            yield delta
