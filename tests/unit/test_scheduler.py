"""Scheduler and block pool, built from plain numbers (no torch, no model)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockAllocator, BlockTable, KVCacheManager, NoFreeBlocksError
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulingPolicy
from engine.sequence import FinishReason, Sequence, SequenceStatus


def make_scheduler(**kw) -> Scheduler:
    cfg = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg))


def seq(seq_id: str, prompt_len: int, max_tokens: int = 8, first: int = 0) -> Sequence:
    return Sequence(seq_id, list(range(first, first + prompt_len)), SamplingParams(max_tokens))


def run_step(s: Scheduler, next_token: int = 7):
    """Execute a plan as the engine would: counters move, sampling chunks append a token."""
    out = s.schedule()
    s.step_done(out)
    for chunk in out.chunks:
        if chunk.samples:
            chunk.seq.token_ids.append(next_token)
            if chunk.seq.num_output_tokens >= chunk.seq.params.max_tokens:
                s.finish(chunk.seq, FinishReason.LENGTH)
    return out


def test_prompts_prefill_together_then_decode_one_token_each():
    s = make_scheduler()
    a, b = seq("a", 10), seq("b", 6)
    s.add(a)
    s.add(b)
    out = run_step(s)
    assert [(c.seq.seq_id, c.start, c.num_tokens) for c in out.chunks] == [
        ("a", 0, 10),
        ("b", 0, 6),
    ]
    out = run_step(s)
    assert [(c.seq.seq_id, c.start, c.num_tokens) for c in out.chunks] == [
        ("a", 10, 1),
        ("b", 6, 1),
    ]
    assert all(c.samples for c in out.chunks)


def test_token_budget_chunks_long_prompt_and_decodes_go_first():
    s = make_scheduler(max_num_batched_tokens=8)
    s.add(seq("short", 3))
    run_step(s)  # short prefilled
    s.add(seq("long", 20))
    out = run_step(s)
    assert [(c.seq.seq_id, c.num_tokens) for c in out.chunks] == [("short", 1), ("long", 7)]
    assert not out.chunks[1].samples  # a partial prefill samples nothing
    out = run_step(s)
    assert [(c.seq.seq_id, c.start, c.num_tokens) for c in out.chunks] == [
        ("short", 4, 1),
        ("long", 7, 7),
    ]
    out = run_step(s)
    assert out.chunks[1].start == 14 and out.chunks[1].num_tokens == 6 and out.chunks[1].samples


def test_max_num_seqs_caps_the_running_batch():
    s = make_scheduler(max_num_seqs=2)
    for i in range(4):
        s.add(seq(str(i), 3))
    out = run_step(s)
    assert {c.seq.seq_id for c in out.chunks} == {"0", "1"}
    assert len(s.waiting) == 2


def test_finished_sequence_frees_blocks_and_slot_is_refilled_next_step():
    s = make_scheduler(max_num_seqs=1)
    s.add(seq("a", 3, max_tokens=1))
    s.add(seq("b", 3, max_tokens=1))
    run_step(s)
    assert s.allocator.num_used == 0  # "a" finished after its first token
    out = run_step(s)
    assert [c.seq.seq_id for c in out.chunks] == ["b"]


def test_static_policy_admits_nothing_until_batch_finishes():
    s = make_scheduler(policy=SchedulingPolicy.STATIC, max_num_seqs=2)
    s.add(seq("a", 3, max_tokens=1))
    s.add(seq("b", 3, max_tokens=4))
    s.add(seq("c", 3, max_tokens=1))
    run_step(s)  # a finishes at once, b keeps running
    for _ in range(3):
        out = run_step(s)
        # c waits for the whole batch; a keeps its lane, computing pad tokens
        assert [(c.seq.seq_id, c.pad, c.samples) for c in out.chunks] == [
            ("b", False, True),
            ("a", True, False),
        ]
    assert s.allocator.num_used == 0  # the batch ended: pad lanes gave their blocks back
    out = run_step(s)
    assert [c.seq.seq_id for c in out.chunks] == ["c"]


def test_preemption_when_blocks_run_out_recomputes_youngest():
    s = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=4)
    old, young = seq("old", 7, max_tokens=20), seq("young", 7, max_tokens=20)
    s.add(old)
    s.add(young)
    run_step(s)  # 7 prompt tokens each in 2 blocks: the pool is full
    run_step(s)  # position 7 still fits the second block
    out = run_step(s)  # position 8 needs a third block each: the young one is preempted
    assert out.preempted == [young]
    assert young.status is SequenceStatus.WAITING and young.num_computed_tokens == 0
    assert young.blocks.block_ids == [] and young.num_preemptions == 1
    assert [c.seq.seq_id for c in out.chunks] == ["old"]


def test_prefix_cache_hit_skips_computed_blocks():
    s = make_scheduler(block_size=4)
    a = seq("a", 10)
    s.add(a)
    run_step(s)
    a_blocks = list(a.blocks.block_ids)
    s.finish(a, FinishReason.STOP)
    b = seq("b", 11)  # same first 10 tokens, then one more
    s.add(b)
    out = s.schedule()
    assert out.chunks[0].start == 8  # two full blocks reused
    assert b.blocks.block_ids[:2] == a_blocks[:2]


def test_prefix_cache_checks_tokens_on_hash_hit():
    alloc = BlockAllocator(8, 4)
    kv = KVCacheManager(alloc)
    t = BlockTable()
    kv.grow(t, 4)
    alloc.publish(t.block_ids[0], prefix_hash=123, token_ids=[1, 2, 3, 4])
    assert alloc.lookup(123, [1, 2, 3, 5]) is None  # same key, other tokens: a miss
    assert alloc.lookup(123, [1, 2, 3, 4]) == t.block_ids[0]


def test_allocator_hands_out_never_used_blocks_first_then_the_least_recently_freed():
    # blocks are made as they are first handed out; the order is the one a full free list
    # gives: never-used by id, then freed ones, oldest free first
    alloc = BlockAllocator(4, 4)
    assert (alloc.num_blocks, alloc.num_free) == (4, 4)
    assert [alloc.allocate() for _ in range(3)] == [0, 1, 2]
    alloc.free(1)
    alloc.free(0)
    assert alloc.num_free == 3
    assert [alloc.allocate() for _ in range(3)] == [3, 1, 0]
    assert alloc.num_free == 0
    with pytest.raises(NoFreeBlocksError):
        alloc.allocate()
    fresh = BlockAllocator(4, 4)
    with pytest.raises(RuntimeError, match="double free"):
        fresh.free(2)  # never handed out


def test_remote_kv_sequence_joins_batch_when_pages_land():
    s = make_scheduler()
    r = seq("remote", 9)
    blocks = s.reserve_remote(r, 9)
    assert len(blocks) == 3 and r.status is SequenceStatus.AWAITING_KV
    assert s.schedule().is_empty  # nothing to run until the KV is here
    r.token_ids.append(42)  # the first token, sampled by the prefill worker
    s.kv_landed("remote", 9)
    out = s.schedule()
    assert [(c.start, c.num_tokens, c.samples) for c in out.chunks] == [(9, 1, True)]


def test_a_reservation_is_a_lane_under_max_num_seqs():
    s = make_scheduler(max_num_seqs=2)
    remote = [seq(f"r{i}", 5) for i in range(3)]
    for r in remote[:2]:
        assert s.reserve_remote(r, 5)
        r.token_ids.append(42)
        s.kv_landed(r.seq_id, 5)
    assert s.reserve_remote(remote[2], 5) is None  # blocks free, but no lane
    assert [c.seq.seq_id for c in s.schedule().chunks] == ["r0", "r1"]
    s.finish(remote[0], FinishReason.STOP)
    assert s.reserve_remote(remote[2], 5)
    remote[2].token_ids.append(42)
    s.kv_landed("r2", 5)
    assert {c.seq.seq_id for c in s.schedule().chunks} == {"r1", "r2"}
    s.abort("r2")
    assert not s.landed


def test_abort_frees_blocks_of_waiting_running_and_awaiting():
    s = make_scheduler()
    a, b, c = seq("a", 5), seq("b", 5), seq("c", 5)
    s.add(a)
    run_step(s)
    s.add(b)
    s.reserve_remote(c, 5)
    for sid in ("a", "b", "c"):
        s.abort(sid)
    assert s.allocator.num_used == 0 and not s.has_work()


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "step", "abort", "remote"]), st.integers(1, 40)),
        max_size=60,
    ),
    policy=st.sampled_from(list(SchedulingPolicy)),
    caching=st.booleans(),
)
def test_random_admit_finish_preempt_returns_every_block(ops, policy, caching):
    s = make_scheduler(
        num_blocks=12,
        block_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        policy=policy,
        enable_prefix_caching=caching,
    )
    live: list[str] = []
    for i, (op, n) in enumerate(ops):
        if op == "add":
            s.add(Sequence(f"s{i}", [n % 5] * min(n, 30), SamplingParams(max_tokens=n % 9 + 1)))
            live.append(f"s{i}")
        elif op == "remote":
            r = Sequence(f"s{i}", [1] * min(n, 30), SamplingParams(max_tokens=3))
            if s.reserve_remote(r, r.num_tokens):
                r.token_ids.append(2)
                s.kv_landed(r.seq_id, r.num_tokens - 1)
                live.append(r.seq_id)
        elif op == "abort" and live:
            s.abort(live.pop(n % len(live)))
        else:
            run_step(s)
        _check_refcounts(s)
    for _ in range(400):
        if not s.has_work():
            break
        run_step(s)
        _check_refcounts(s)
    assert not s.has_work()
    assert s.allocator.num_used == 0


def _check_refcounts(s: Scheduler) -> None:
    """Every block's reference count equals the number of live sequences holding it."""
    holders: dict[int, int] = {}
    for q in [*s.running, *s.waiting, *s.landed, *s.awaiting_kv.values(), *s.padding]:
        for b in q.blocks.block_ids:
            holders[b] = holders.get(b, 0) + 1
    for block in s.allocator.blocks:
        assert block.ref_count == holders.get(block.block_id, 0)
