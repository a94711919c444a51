"""Prefill on one engine, decode on another: the hand-off the workers perform, with the KV
copied layer by layer between the two caches (the transports are tested elsewhere)."""

from __future__ import annotations

import pytest
from tiny_model import make_tiny_checkpoint

from engine import LLM, SamplingParams
from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=4)


def engine(path, **kw) -> LLMEngine:
    cfg = dict(model=str(path), num_kv_blocks=128, block_size=4, num_threads=1)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


@pytest.mark.parametrize("chunk_budget", [2048, 5])
def test_prefill_then_remote_decode_equals_local_generation(tiny, chunk_budget):
    prompts = [[5, 9, 14, 33, 70, 12, 8, 90, 41, 3, 77], [100, 101, 102, 7]]
    expected = [
        o.token_ids
        for o in LLM(model=str(tiny), num_kv_blocks=128, block_size=4, num_threads=1).generate(
            prompts, PARAMS
        )
    ]
    pre = engine(tiny, max_num_batched_tokens=chunk_budget)
    dec = engine(tiny)
    tickets = {f"r{i}": dec.reserve_remote(f"r{i}", p, PARAMS) for i, p in enumerate(prompts)}
    assert dec.step() == []  # nothing runs before the KV lands

    def send_layer(layer, chunks):
        for c in chunks:
            src = c.seq.blocks.block_ids
            dst = tickets[c.seq.seq_id]
            n = -(-(c.start + c.num_tokens) // 4)
            dec.runner.kv_cache[layer, :, dst[:n]] = pre.runner.kv_cache[layer, :, src[:n]]

    for i, p in enumerate(prompts):
        pre.add_request(f"r{i}", p, PARAMS, prefill_only=True)
    firsts = {}
    while pre.has_unfinished():
        for out in pre.step(layer_hook=send_layer):
            assert out.finish_reason == "prefilled" and len(out.token_ids) == 1
            firsts[out.request_id] = out
    assert pre.scheduler.allocator.num_used > 0  # KV held until released
    for rid in firsts:
        pre.release(rid)
    assert pre.scheduler.allocator.num_used == 0

    from engine.sampler import SampledToken

    done = {}
    for rid, out in firsts.items():
        dec.remote_kv_landed(rid, SampledToken(out.token_ids[0]))
    while dec.has_unfinished():
        for out in dec.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    assert [done[f"r{i}"] for i in range(len(prompts))] == expected
    assert dec.scheduler.allocator.num_used == 0


def test_abort_before_kv_lands_frees_reservation(tiny):
    dec = engine(tiny)
    assert dec.reserve_remote("r", [1, 2, 3, 4, 5, 6], PARAMS)
    assert dec.scheduler.allocator.num_used == 2
    dec.abort("r")
    assert dec.scheduler.allocator.num_used == 0
    assert dec.remote_kv_landed("r", None) is None  # late pages for an aborted request
