"""The worker classes in-process (no Ray): a failed KV transfer ends one request, not the
worker, and frees its KV on both sides."""

from __future__ import annotations

import asyncio
import time

import pytest
from tiny_model import make_tiny_checkpoint

from decode_worker.worker import DecodeWorker
from engine import SamplingParams
from engine.engine_config import EngineConfig
from engine.errors import SplitServeError
from kv_transfer.errors import KVTransferError
from kv_transfer.ticket import Ticket
from prefill_worker.worker import PrefillWorker

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [5, 9, 14, 33, 70, 12, 8, 90, 41, 3, 77] * 2


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=4)
    cfg = EngineConfig(model=str(path), num_kv_blocks=256, block_size=4, num_threads=1)
    prefill, decode = PrefillWorker("prefill-0", cfg), DecodeWorker("decode-0", cfg)
    yield prefill, decode
    prefill.shutdown()
    decode.shutdown()


def _blocks_used(worker) -> int:
    return asyncio.run(worker.status())["kv_blocks_used"]


def test_dead_decode_endpoint_fails_one_request_and_worker_goes_on(workers):
    prefill, decode = workers
    dead = Ticket("lost", "decode-9", tuple(range(6)), "127.0.0.1:9", 0)
    with pytest.raises((KVTransferError, SplitServeError)):
        asyncio.run(asyncio.wait_for(prefill.prefill("lost", PROMPT, PARAMS, dead), 60))
    deadline = time.monotonic() + 10
    while _blocks_used(prefill) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _blocks_used(prefill) == 0

    async def good() -> list[int]:
        ticket = await decode.reserve("ok", PROMPT, PARAMS)
        done = await prefill.prefill("ok", PROMPT, PARAMS, ticket)
        marks = done.marks  # the worker's trace marks, in order
        assert marks["received"] <= marks["scheduled"] <= marks["first_token"] <= marks["kv_done"]
        assert marks["kv_first_sent"] <= marks["kv_done"]
        assert done.kv_pages == len(ticket.block_ids) * prefill.num_layers > 0
        tokens = [done.token.token_id]
        async for batch in _stream(decode, "ok"):
            tokens += [t for d in batch for t in d.token_ids]
        return tokens

    assert len(asyncio.run(asyncio.wait_for(good(), 60))) == 6
    assert _blocks_used(prefill) == 0 and _blocks_used(decode) == 0


def test_reservation_whose_pages_never_come_is_reclaimed(workers):
    _, decode = workers

    async def run() -> int:
        ticket = await decode.reserve("orphan", PROMPT, PARAMS)
        assert ticket is not None and _used_now(decode) > 0
        decode.table.get("orphan").lease_deadline_s = 0.0  # the lease runs out
        reaped = await decode.reap_expired()
        batches = [b async for b in _stream(decode, "orphan")]
        assert batches[-1][-1].finish_reason == "abort"
        return reaped

    assert asyncio.run(asyncio.wait_for(run(), 30)) == 1
    assert _blocks_used(decode) == 0


async def _stream(decode, request_id: str):
    """`request_id`'s deltas out of the worker's one output stream, to its finish."""
    async for batch in decode.outputs():
        mine = [d for d in batch if d.request_id == request_id]
        if mine:
            yield mine
            if mine[-1].finish_reason is not None:
                return


def _used_now(worker) -> int:
    return worker.engine.scheduler.allocator.num_used
