"""Decode worker (Ray actor `decode-<j>`): continuous batching over KV that prefill sent.

    router ── reserve(id, prompt, params) ──> blocks allocated and owned by a transfer with
        a lease and a tag, in one command on the engine thread ──> Ticket(blocks, tag)
    router ── renew(ids) every few seconds while the prompt waits for its prefill
    prefill ── KV pages (gRPC or collective, tag checked) ──> written into those blocks
    prefill ── done(first token) ──> READY: the transfer lets go of the blocks (FREED) and
        the engine's sequence owns them ──> admitted at the next step (RUNNING)
    every step: one token per running sequence ──> the outbox: one batch of every request's
        deltas per step, to the router's single outputs() stream (decode_worker.outbox)
    abort(id) / lease expiry / failed transfer / stream closed early ──> `_end`: on the
        engine thread, the transfer is released (its Push cancelled) and then the engine
        frees the blocks, so a block never has two owners

In colocated mode the same worker takes whole requests (`submit`) and runs
both phases with the same engine and scheduler; their deltas go out the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from decode_worker.outbox import Outbox
from engine.engine_config import EngineConfig
from engine.engine_loop import EngineLoop, TokenDelta
from engine.llm_engine import LLMEngine
from engine.profile import profile as engine_profile
from engine.ray_metrics import publish_metrics
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from engine.threads import engine_here, set_threads
from kv_transfer.auth import new_secret, ticket_tag
from kv_transfer.state import KVTransfer, TransferTable
from kv_transfer.ticket import Ticket
from kv_transfer.transport import TransportConfig, make_receiver, node_address

LEASE_S = 30.0  # a reservation not renewed, and whose pages have not landed, is reclaimed


class DecodeWorker:
    def __init__(self, name: str, config: EngineConfig, transport: TransportConfig | None = None):
        set_threads(config)
        self.name = name
        self.loop = EngineLoop(lambda: engine_here(config), name=f"{name}-loop")
        self.engine = self.loop.engine
        self.table = TransferTable()
        self.metrics = publish_metrics(self.loop, config.model, name)
        self.expired = 0  # reservations whose lease ran out before their pages landed
        self.transport = transport or TransportConfig()
        self._secret = self.transport.secret or new_secret()
        self.outbox = Outbox()
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
            "pid": os.getpid(),
            "endpoint": self.endpoint,
        }

    async def status(self) -> dict[str, Any]:
        snapshot = await asyncio.wrap_future(self.loop.call(LLMEngine.snapshot))
        return {
            **snapshot,
            "kv_transfers": len(self.table),
            "kv_streams_open": self._receiver.open_streams(),
            "kv_pushes_refused": self._receiver.refused,
            "kv_transfers_expired": self.expired,
        }

    # ---- disaggregated path ---------------------------------------------------------
    async def reserve(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Ticket | None:
        self._aio = asyncio.get_running_loop()
        self.outbox.bind(self._aio)
        if self._reaper is None:
            self._reaper = self._aio.create_task(self._reap_forever())
        tag = ticket_tag(self._secret, self.name, request_id, secrets.token_bytes(16))

        def reserve_on_loop(engine: LLMEngine) -> tuple[list[int], int] | None:
            blocks = engine.reserve_remote(request_id, prompt_token_ids, params)
            if blocks is None:
                return None
            try:  # the blocks and their transfer come into being together
                layers = engine.model_config.num_layers
                self.table.reserve(request_id, tuple(blocks), layers, LEASE_S, tag=tag)
            except BaseException:
                engine.abort(request_id)
                raise
            # The router already streamed the first token (from prefill): skip it here.
            self.loop.register_sink(request_id, self.outbox.put, num_sent=1)
            return blocks, engine.scheduler.allocator.num_free

        reserved = await asyncio.wrap_future(self.loop.call(reserve_on_loop))
        if reserved is None:
            return None
        blocks, free = reserved
        return Ticket(request_id, self.name, tuple(blocks), self.endpoint, free, tag)

    async def renew(self, request_ids: list[str]) -> list[str]:
        """The router still waits on these prompts' prefills: extend their leases. Returns
        the ids whose reservation is gone (the router stops waiting for them)."""
        return self.table.renew(request_ids, LEASE_S)

    def _on_ready(self, transfer: KVTransfer) -> None:
        """Called by the KV receiver when every page and the first token are in."""
        assert transfer.first_token_id is not None  # READY carries it
        first = SampledToken(transfer.first_token_id)
        transfer.start_running()
        self.table.free(transfer.request_id)  # every page is in: the sequence owns the blocks
        self.loop.land_remote(transfer.request_id, first)

    def _on_failed(self, transfer: KVTransfer) -> None:
        """A bad page, a missing layer, a sender gone: the request ends, its blocks freed."""
        self._end(transfer.request_id)

    def _end(self, request_id: str) -> None:
        """The one way a reserved request ends early: its transfer (and Push) first, then the
        engine's blocks, in one command on the engine thread."""
        self._receiver.cancel(request_id)
        with contextlib.suppress(RuntimeError):  # the loop is stopped: nothing is held
            self.loop.abort(request_id, before=lambda: self.table.release(request_id))

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

    async def outputs(self) -> AsyncIterator[list[TokenDelta]]:
        """Every request's deltas, one batch per engine step (the router's one stream)."""
        async for batch in self.outbox.batches():
            yield batch

    async def abort(self, request_id: str) -> None:
        self._end(request_id)

    async def profile(self) -> dict[str, dict[int, float]]:
        """This worker's capacity (engine.profile), measured now: call it while it is idle."""
        return await asyncio.wrap_future(self.loop.call(engine_profile))

    async def reap_expired(self) -> int:
        """End reservations whose lease ran out before their pages landed."""
        expired = self.table.expire(time.monotonic())
        self.expired += len(expired)
        for transfer in expired:
            self._end(transfer.request_id)
        return len(expired)

    async def _reap_forever(self, period_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(period_s)  # a lease timer, not a state poll
            await self.reap_expired()

    # ---- colocated path ---------------------------------------------------------------
    async def submit(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Colocated mode: prefill and decode here; deltas go out through `outputs()`.
        A bad prompt raises here, to the caller."""
        self.outbox.bind(asyncio.get_running_loop())
        self.loop.submit(request_id, prompt_token_ids, params, self.outbox.put)

    def shutdown(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        self.loop.stop()
        self._receiver.close()
