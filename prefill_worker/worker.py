"""Prefill worker (Ray actor `prefill-<i>`): compute a prompt's KV, stream it, sample token 1.

router ── prefill(id, prompt, params, ticket) ──> queued in the engine (prefill_only);
           the transfer is noted (its call opens with the first page, carrying ticket.tag)
each step: the batch's prompts (chunked when long) run layer by layer;
           after layer l: its pages go to the decode worker (sender thread, overlaps l+1)
last chunk: first token sampled ──> done(first token) to the decode worker, await its ack
ack ──> own KV released; first token and the timing marks returned to the router (TTFT)
a failed transfer (peer dead, lease gone, refused) ──> KVTransferError to the router
abort(id) ──> PrefillAborted
every exit: the transfer is aborted unless acked, and own KV released (the `finally`)
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from engine.engine_config import EngineConfig
from engine.engine_loop import EngineLoop, TokenDelta, stream
from engine.errors import SplitServeError
from engine.llm_engine import LLMEngine
from engine.profile import profile as engine_profile
from engine.ray_metrics import publish_metrics
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk
from engine.threads import engine_here, set_threads
from kv_transfer.errors import KVTransferError
from kv_transfer.ticket import Ticket
from kv_transfer.transport import TransportConfig, make_sender, node_address, peer_of


class PrefillAborted(SplitServeError):
    """The request was aborted (or its transfer failed) before its first token was sent."""


@dataclass(slots=True)
class Prefilled:
    """What `prefill` returns: token 1, the request's timing marks here (wall clock:
    received, scheduled, first_token, kv_first_sent, kv_done; router.trace) and the KV
    moved for it."""

    token: SampledToken
    marks: dict[str, float]
    kv_bytes: int = 0
    kv_pages: int = 0  # one block of one layer (its K and V)


class PrefillWorker:
    def __init__(
        self,
        name: str,
        config: EngineConfig,
        transport: TransportConfig | None = None,
        layerwise: bool = True,
    ):
        set_threads(config)
        self.name = name
        self.loop = EngineLoop(
            lambda: engine_here(config),  # made on the loop's thread (see EngineLoop)
            name=f"{name}-loop",
            layer_hook=self._on_layer,
            prefill_only=True,
        )
        self.engine = self.loop.engine
        self.block_size = config.block_size
        self.layerwise = layerwise
        self.num_layers = self.engine.model_config.num_layers
        self.metrics = publish_metrics(self.loop, config.model, name)
        self._tickets: dict[str, Ticket] = {}
        self._sent_upto: dict[str, int] = {}  # tokens whose pages went out (all layers)
        self._first_sent: dict[str, float] = {}  # when a request's first page went out
        kv = self.engine.runner.kv_cache  # [layers, 2, blocks, block_size, KVH, D]
        self._page_bytes = kv[0, :, 0].numel() * kv.element_size()
        self._failed: dict[str, str] = {}  # request id -> why its transfer failed
        self.transport = transport or TransportConfig()
        self.sender = make_sender(self.transport, name)

    def info(self) -> dict[str, Any]:
        c = self.engine.model_config
        return {
            "name": self.name,
            "max_model_len": self.engine.max_model_len,
            "vocab_size": c.vocab_size,
            "node": node_address(),
            "pid": os.getpid(),
            "endpoint": "",
        }

    async def status(self) -> dict[str, Any]:
        snapshot = await asyncio.wrap_future(self.loop.call(LLMEngine.snapshot))
        return {**snapshot, "kv_streams_open": self.sender.open_streams()}

    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, ticket: Ticket
    ) -> Prefilled:
        marks = {"received": time.time()}
        self._tickets[request_id] = ticket
        self._sent_upto[request_id] = 0
        self.sender.begin(request_id, peer_of(self.transport, ticket), ticket.tag)
        first: TokenDelta | None = None
        try:
            async for delta in stream(self.loop, request_id, prompt_token_ids, params):
                first = delta
                marks.update(delta.marks or {})
            if request_id in self._failed:
                raise KVTransferError(self._failed[request_id])
            if first is None or not first.token_ids:
                raise PrefillAborted(f"request {request_id} ended before its first token")
            token = SampledToken(first.token_ids[0])
            if first.logprobs:
                token = first.logprobs[0]
            if not self.layerwise:  # baseline: every page after the whole prefill
                self._first_sent[request_id] = time.time()
                await asyncio.to_thread(self._send_all, request_id)
            await asyncio.to_thread(
                self.sender.finish, request_id, token.token_id, len(prompt_token_ids)
            )
            marks["kv_done"] = time.time()
            if request_id in self._first_sent:
                marks["kv_first_sent"] = self._first_sent[request_id]
            pages = len(ticket.block_ids) * self.num_layers
            return Prefilled(token, marks, pages * self._page_bytes, pages)
        finally:
            self.sender.abort(request_id)  # a no-op once acked; else the decode side frees
            self._tickets.pop(request_id, None)
            self._sent_upto.pop(request_id, None)
            self._failed.pop(request_id, None)
            self._first_sent.pop(request_id, None)
            self.loop.call(lambda e: e.release(request_id))

    async def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    async def profile(self) -> dict[str, dict[int, float]]:
        """This worker's capacity (engine.profile), measured now: call it while it is idle."""
        return await asyncio.wrap_future(self.loop.call(engine_profile))

    def _on_layer(self, layer: int, chunks: list[ScheduledChunk]) -> None:
        """After layer `layer` of a step: its pages for every chunk in the step go out."""
        if not self.layerwise:
            return
        bs = self.block_size
        for chunk in chunks:
            rid = chunk.seq.seq_id
            ticket = self._tickets.get(rid)
            if ticket is None:
                continue
            first_block = self._sent_upto.get(rid, 0) // bs
            end_block = -(-(chunk.start + chunk.num_tokens) // bs)
            src = chunk.seq.blocks.block_ids[first_block:end_block]
            dst = ticket.block_ids[first_block:end_block]
            if rid not in self._first_sent:
                self._first_sent[rid] = time.time()
            try:
                self.sender.send_layer(rid, self.engine.runner.kv_cache, layer, src, dst)
            except KVTransferError as error:  # this request's peer failed: end it, not the worker
                self._tickets.pop(rid, None)
                self._failed[rid] = str(error)
                self.loop.abort(rid)
                continue
            if layer == self.num_layers - 1:
                self._sent_upto[rid] = chunk.start + chunk.num_tokens

    def _send_all(self, request_id: str) -> None:
        ticket = self._tickets[request_id]
        seq = self.engine.scheduler.held.get(request_id)
        if seq is None:
            return
        n = len(ticket.block_ids)
        for layer in range(self.num_layers):
            self.sender.send_layer(
                request_id,
                self.engine.runner.kv_cache,
                layer,
                seq.blocks.block_ids[:n],
                ticket.block_ids[:n],
            )

    def shutdown(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        self.loop.stop()
        self.sender.close()
