"""engine.fused_decode: a decode step's layers in one C++ call (bf16, AMX) give the hidden
states of the layers run one Python call at a time, bit for bit, and only decode steps take it."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_model import make_tiny_checkpoint

from engine import LLM, SamplingParams
from engine.linear import amx_usable

needs_amx = pytest.mark.skipif(
    not amx_usable(torch.empty(32, 32, dtype=torch.bfloat16)), reason="no AMX on this CPU"
)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # head dim 64 (the AVX-512 attention path), GQA 2:1, every side a multiple of 32 (AMX)
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-fused"), seed=11, num_layers=3, hidden_size=128,
        num_heads=2, num_kv_heads=1, intermediate_size=256,
    )  # fmt: skip


def _llm(path, dtype: str = "bfloat16") -> LLM:
    return LLM(
        model=str(path), dtype=dtype, num_kv_blocks=128, block_size=4, max_num_seqs=8,
        num_threads=2,
    )  # fmt: skip


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 399, (3 + 4 * i,), generator=g).tolist() for i in range(n)]


@needs_amx
def test_fused_step_equals_the_layers_one_call_at_a_time(tiny_dir):
    llm = _llm(tiny_dir)
    runner = llm.engine.runner
    fused = runner.fused
    assert fused is not None
    real_run, batches = fused.run, []

    def checked_run(ids, pos, kv_cache, meta):
        out = real_run(ids, pos, kv_cache, meta)
        # the layers rewrite the same K/V into the same slots: the cache is unchanged by it
        ref = runner.model(ids, pos, kv_cache, meta)
        assert torch.equal(out, ref), (out - ref).abs().max()
        batches.append(ids.shape[0])
        return out

    fused.run = checked_run
    prompts = _prompts(5)
    outs = llm.generate(prompts, GREEDY)
    assert max(batches) == 5 and len(batches) >= GREEDY.max_tokens - 1
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)


@needs_amx
@pytest.mark.parametrize("thread", [1, 0])  # 1: the helper stalls; 0: the caller does
def test_items_of_a_stalled_thread_are_taken_over_with_the_same_result(tiny_dir, thread):
    """A thread the OS preempts, played by one that sleeps 2 ms holding every third item it
    claims: the other takes those items over, the sleeper's late results are dropped, and
    every step still equals the layers one call at a time."""
    llm = _llm(tiny_dir)
    runner = llm.engine.runner
    fused = runner.fused
    assert fused is not None
    kernels = fused.kernels
    real_run, checked = fused.run, []

    def checked_run(ids, pos, kv_cache, meta):
        out = real_run(ids, pos, kv_cache, meta)
        checked.append(torch.equal(out, runner.model(ids, pos, kv_cache, meta)))
        return out

    fused.run = checked_run
    before = kernels.team_takeovers()
    kernels.team_debug_stall(thread, 3, 2000)
    try:
        llm.generate(_prompts(4), GREEDY)
    finally:
        kernels.team_debug_stall(-1, 0, 0)
    assert checked and all(checked)
    if thread == 1:  # the caller takes a sleeping helper's items over, every step
        assert kernels.team_takeovers() > before
    # thread 0: whether the helper is awake to take the caller's items over depends on when
    # the OS runs it (0 in some runs, seen here); equality is what holds either way


@needs_amx
def test_fused_decode_gives_the_same_tokens_batched_and_alone(tiny_dir):
    prompts = _prompts(6)
    fused_llm = _llm(tiny_dir)
    batched = [o.token_ids for o in fused_llm.generate(prompts, GREEDY)]
    alone = [fused_llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    plain_llm = _llm(tiny_dir)
    plain_llm.engine.runner.fused = None
    assert batched == [o.token_ids for o in plain_llm.generate(prompts, GREEDY)]
    assert alone == batched  # a fused batch leaves nothing behind in a later request's KV


@needs_amx
def test_two_engines_decoding_at_once_in_one_process(tiny_dir):
    """The fused steps of two engines on two threads (the process's workspace and threads are
    shared: one step at a time) give each engine its own tokens."""
    prompts = _prompts(5)
    expected = [o.token_ids for o in _llm(tiny_dir).generate(prompts, GREEDY)]
    engines = [_llm(tiny_dir), _llm(tiny_dir)]
    results: list[list[list[int]]] = [[], []]

    def generate(k: int) -> None:
        results[k] = [o.token_ids for o in engines[k].generate(prompts, GREEDY)]

    threads = [threading.Thread(target=generate, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [expected, expected]


@needs_amx
def test_prefill_and_mixed_steps_keep_the_layer_path(tiny_dir):
    llm = _llm(tiny_dir)
    fused = llm.engine.runner.fused
    assert fused is not None
    rows: list[int] = []  # prefill chunks in each step that took the fused path
    real_run = fused.run

    def counted_run(ids, pos, kv_cache, meta):
        rows.append(len(meta.prefills))
        return real_run(ids, pos, kv_cache, meta)

    fused.run = counted_run
    llm.generate(_prompts(1), SamplingParams(max_tokens=1, temperature=0.0))
    assert rows == []  # one prefill step, no decode: the fused path never ran
    llm.generate(_prompts(2), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert rows and set(rows) == {0}


def test_fused_decode_is_off_in_float32(tiny_dir):
    assert _llm(tiny_dir, dtype="float32").engine.runner.fused is None
