"""Decode worker (Ray actor `decode-<j>`): continuous batching over KV that prefill sent.

    router ── reserve(id, prompt, params) ──> blocks reserved (lease)   -> Ticket
    prefill ── KV pages (gRPC or collective) ──> written into those blocks
    prefill ── done(first token) ──> READY ──> admitted at the next step (RUNNING)
    every step: one token per running sequence ──> stream(id) yields deltas to the router
    finish / abort(id) / lease expiry / failed transfer ──> blocks freed (FREED)

In colocated mode the same worker takes whole requests (`generate`) and runs
both phases with the same engine and scheduler.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from engine.engine_config import EngineConfig
from engine.engine_loop import EngineLoop, TokenDelta
from engine.llm_engine import LLMEngine
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from engine.threads import set_threads
from kv_transfer.state import KVTransfer, TransferTable
from kv_transfer.ticket import Ticket
from kv_transfer.transport import TransportConfig, make_receiver, node_address

LEASE_S = 60.0  # a reservation whose pages have not all landed by then is reclaimed


class DecodeWorker:
    def __init__(self, name: str, config: EngineConfig, transport: TransportConfig | None = None):
        set_threads(config)
        self.name = name
        self.engine = LLMEngine(config)
        self.loop = EngineLoop(self.engine, name=f"{name}-loop")
        self.table = TransferTable()
        self.transport = transport or TransportConfig()
        self._queues: dict[str, asyncio.Queue[TokenDelta]] = {}
        self._aio: asyncio.AbstractEventLoop | None = None
        self._reaper: asyncio.Task | None = None
        kv = self.engine.runner.kv_cache
        self._receiver: Any = make_receiver(
            self.transport, kv, self.table, self._on_ready, self._on_failed, name
        )
        self.endpoint = self._receiver.endpoint

    # ---- info ---------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        c = self.engine.model_config
        return {
            "name": self.name,
            "max_model_len": self.engine.max_model_len,
            "vocab_size": c.vocab_size,
            "num_layers": c.num_layers,
            "node": node_address(),
            "endpoint": self.endpoint,
        }

    async def status(self) -> dict[str, Any]:
        return await asyncio.wrap_future(self.loop.call(LLMEngine.snapshot))

    # ---- disaggregated path ---------------------------------------------------------
    async def reserve(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Ticket | None:
        self._aio = asyncio.get_running_loop()
        if self._reaper is None:
            self._reaper = self._aio.create_task(self._reap_forever())
        blocks = await asyncio.wrap_future(
            self.loop.call(lambda e: e.reserve_remote(request_id, prompt_token_ids, params))
        )
        if blocks is None:
            return None
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._queues[request_id] = queue
        aio = self._aio
        # The router already streamed the first token (from prefill): skip it here.
        self.loop.register_sink(
            request_id, lambda d: aio.call_soon_threadsafe(queue.put_nowait, d), num_sent=1
        )
        self.table.reserve(
            request_id,
            tuple(blocks),
            self.engine.model_config.num_layers,
            LEASE_S,
        )
        free = self.engine.scheduler.allocator.num_free
        return Ticket(request_id, self.name, tuple(blocks), self.endpoint, free)

    def _on_ready(self, transfer: KVTransfer) -> None:
        """Called by the KV receiver when every page and the first token are in."""
        assert transfer.first_token_id is not None  # READY carries it
        first = SampledToken(transfer.first_token_id)
        self.loop.land_remote(transfer.request_id, first)
        transfer.start_running()

    def _on_failed(self, transfer: KVTransfer) -> None:
        """A bad page or a missing layer: the request ends and its blocks are freed."""
        self.loop.abort(transfer.request_id)

    # ---- collective transport: the prefill side drives these (recv blocks: off the loop)
    async def kv_join(self, group: str, backend: str) -> None:
        await asyncio.to_thread(self._receiver.join, group, backend)

    async def kv_recv_layer(self, group: str, header) -> None:
        await asyncio.to_thread(self._receiver.recv_layer, group, header)

    async def kv_done(self, request_id: str, first_token_id: int, num_prompt_tokens: int) -> str:
        return await asyncio.to_thread(
            self._receiver.done, request_id, first_token_id, num_prompt_tokens
        )

    async def kv_leave(self, group: str) -> None:
        await asyncio.to_thread(self._receiver.leave, group)

    async def stream(self, request_id: str) -> AsyncIterator[list[TokenDelta]]:
        """Deltas of a reserved request, batched by what is ready at each wake-up."""
        queue = self._queues.get(request_id)
        if queue is None:
            return
        try:
            async for batch in _drain(queue):
                yield batch
        finally:
            self._queues.pop(request_id, None)
            self._free_transfer(request_id)

    async def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)
        self._free_transfer(request_id)

    def _free_transfer(self, request_id: str) -> None:
        self.table.release(request_id)

    async def reap_expired(self) -> int:
        """Abort reservations whose lease ran out before their pages landed."""
        expired = self.table.expire(time.monotonic())
        for transfer in expired:
            self.loop.abort(transfer.request_id)
        return len(expired)

    async def _reap_forever(self, period_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(period_s)  # a lease timer, not a state poll
            await self.reap_expired()

    # ---- colocated path ---------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[list[TokenDelta]]:
        """Colocated mode: prefill and decode here; early exit aborts the request."""
        aio = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        sink = lambda d: aio.call_soon_threadsafe(queue.put_nowait, d)  # noqa: E731
        self.loop.submit(request_id, prompt_token_ids, params, sink)
        finished = False
        try:
            async for batch in _drain(queue):
                finished = batch[-1].finish_reason is not None
                yield batch
        finally:
            if not finished:
                self.loop.abort(request_id)

    def shutdown(self) -> None:
        self.loop.stop()
        self._receiver.close()


async def _drain(queue: asyncio.Queue[TokenDelta]) -> AsyncIterator[list[TokenDelta]]:
    """Yield everything queued at each wake-up, until a delta carries a finish reason."""
    while True:
        batch = [await queue.get()]
        while not queue.empty():
            batch.append(queue.get_nowait())
        yield batch
        if batch[-1].finish_reason is not None:
            return
