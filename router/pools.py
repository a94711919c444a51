"""Worker pools on Ray and the `RayBackend` the front ends talk to.

generate(id, prompt, params):
  disaggregated: decode D = most free KV blocks, fewest in flight -> D.reserve -> Ticket
                 prefill P = power of two choices on queued prefill tokens
                 P.prefill(ticket) -> first token (yielded at once: TTFT)
                 D.stream(id) -> the remaining tokens
  colocated:     worker W = least loaded -> W.generate(id) streams everything
  leaving early (disconnect, stop string): abort on P and D, blocks freed there
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from decode_worker.worker import DecodeWorker
from engine.engine_config import EngineConfig
from engine.engine_loop import TokenDelta
from engine.errors import OverloadedError
from engine.loader import load_tokenizer, resolve_model
from engine.sampling_params import SamplingParams
from prefill_worker.worker import ACTOR_NAMESPACE as NAMESPACE
from prefill_worker.worker import PrefillWorker


@dataclass(frozen=True, slots=True)
class PoolConfig:
    engine: EngineConfig
    num_prefill: int = 1
    num_decode: int = 1
    mode: str = "disaggregated"  # | "colocated"
    kv_transport: str = "grpc"  # | "collective"
    layerwise: bool = True
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    reserve_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"unknown mode {self.mode!r}")
        if self.kv_transport not in ("grpc", "collective"):
            raise ValueError(f"unknown kv transport {self.kv_transport!r}")
        if self.num_decode < 1 or (self.mode == "disaggregated" and self.num_prefill < 1):
            raise ValueError("each pool needs at least one worker")


@dataclass(slots=True)
class _Member:
    name: str
    actor: Any
    in_flight: int = 0
    queued_tokens: int = 0
    free_blocks: int = 1 << 30


@dataclass
class RayBackend:
    config: PoolConfig
    model_name: str = "smollm2-135m"
    prefill: list[_Member] = field(default_factory=list)
    decode: list[_Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        cfg = self.config
        threads = max(1, math.floor(cfg.cpus_per_worker))
        engine = _with_threads(cfg.engine, threads)
        options = dict(
            num_cpus=cfg.cpus_per_worker,
            num_gpus=cfg.gpus_per_worker,
            namespace=NAMESPACE,
            max_concurrency=1000,
        )
        decode_cls = ray.remote(DecodeWorker)
        # Colocated: the same slots (GPUs) as disaggregated, each worker doing both phases.
        n_decode = (
            cfg.num_decode if cfg.mode == "disaggregated" else cfg.num_decode + cfg.num_prefill
        )
        for j in range(n_decode):
            name = f"decode-{j}"
            actor = decode_cls.options(name=name, **options).remote(name, engine, cfg.kv_transport)
            self.decode.append(_Member(name, actor))
        if cfg.mode == "disaggregated":
            prefill_cls = ray.remote(PrefillWorker)
            for i in range(cfg.num_prefill):
                name = f"prefill-{i}"
                prefill_actor = prefill_cls.options(name=name, **options).remote(
                    name, engine, cfg.kv_transport, cfg.layerwise
                )
                self.prefill.append(_Member(name, prefill_actor))
        info = ray.get([m.actor.info.remote() for m in self.decode + self.prefill], timeout=600)
        self.max_model_len = min(i["max_model_len"] for i in info)
        self.vocab_size = info[0]["vocab_size"]
        self.tokenizer = load_tokenizer(resolve_model(cfg.engine.model))

    # ---- Backend -------------------------------------------------------------------
    def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[TokenDelta]:
        if self.config.mode == "colocated":
            return self._colocated(request_id, list(prompt_token_ids), params)
        return self._disaggregated(request_id, list(prompt_token_ids), params)

    async def _colocated(self, rid: str, ids: list[int], params: SamplingParams):
        worker = min(self.decode, key=lambda m: (m.in_flight, random.random()))
        worker.in_flight += 1
        finished = False
        try:
            stream = worker.actor.generate.options(num_returns="streaming").remote(rid, ids, params)
            async for delta in _relay(stream):
                finished = delta.finish_reason is not None
                yield delta
        finally:
            worker.in_flight -= 1
            if not finished:
                worker.actor.abort.remote(rid)

    async def _disaggregated(self, rid: str, ids: list[int], params: SamplingParams):
        decode, ticket = await self._reserve(rid, ids, params)
        prefill = self._pick_prefill()
        prefill.queued_tokens += len(ids)
        decode.in_flight += 1
        finished = False
        stream = decode.actor.stream.options(num_returns="streaming").remote(rid)
        try:
            try:
                first = await prefill.actor.prefill.remote(rid, ids, params, ticket)
            finally:
                prefill.queued_tokens -= len(ids)
            yield TokenDelta(
                rid,
                [first.token_id],
                [first] if params.logprobs is not None else None,
                None,
                len(ids),
                1,
            )
            async for delta in _relay(stream):
                finished = delta.finish_reason is not None
                yield delta
        finally:
            decode.in_flight -= 1
            if not finished:
                prefill.actor.abort.remote(rid)
                decode.actor.abort.remote(rid)

    async def _reserve(self, rid: str, ids: list[int], params: SamplingParams):
        """Reserve KV on the decode worker with the most room; wait (bounded) when all are full."""
        deadline = asyncio.get_running_loop().time() + self.config.reserve_timeout_s
        delay = 0.01
        while True:
            order = sorted(
                self.decode, key=lambda m: (-m.free_blocks + 8 * m.in_flight, random.random())
            )
            for member in order:
                ticket = await member.actor.reserve.remote(rid, ids, params)
                if ticket is not None:
                    member.free_blocks = ticket.free_blocks
                    return member, ticket
                member.free_blocks = 0
            if asyncio.get_running_loop().time() > deadline:
                raise OverloadedError("no decode worker has free KV blocks; try again later")
            await asyncio.sleep(delay)  # back-off while decodes finish and free blocks
            delay = min(delay * 2, 0.5)

    def _pick_prefill(self) -> _Member:
        if len(self.prefill) == 1:
            return self.prefill[0]
        a, b = random.sample(self.prefill, 2)
        return a if a.queued_tokens <= b.queued_tokens else b

    async def status(self) -> dict[str, Any]:
        members = [("prefill", m) for m in self.prefill] + [("decode", m) for m in self.decode]
        stats = await asyncio.gather(*(m.actor.status.remote() for _, m in members))
        workers = []
        for (role, m), st in zip(members, stats, strict=True):
            if role == "decode":
                m.free_blocks = st["kv_blocks_total"] - st["kv_blocks_used"]
            role = role if self.config.mode == "disaggregated" else "colocated"
            workers.append({"name": m.name, "role": role, **st})
        return {
            "model": self.model_name,
            "mode": self.config.mode,
            "kv_transport": self.config.kv_transport,
            "workers": workers,
        }

    async def healthy(self) -> bool:
        try:
            await asyncio.wait_for(self.status(), timeout=10)
            return True
        except Exception:  # noqa: BLE001 - any failure means unhealthy
            return False

    def shutdown(self) -> None:
        for m in self.prefill + self.decode:
            with contextlib.suppress(Exception):  # best effort; the kill below is what counts
                ray.get(m.actor.shutdown.remote(), timeout=10)
            ray.kill(m.actor)


async def _relay(stream) -> AsyncIterator[TokenDelta]:
    """Flatten a worker's streamed batches of deltas."""
    async for ref in stream:
        for delta in await ref:
            yield delta


def _with_threads(config: EngineConfig, threads: int) -> EngineConfig:
    if config.num_threads:
        return config
    return dataclasses.replace(config, num_threads=threads)
