"""The engine end to end on a tiny seeded Llama: paging, batching and recovery paths
must not change what the model computes."""

from __future__ import annotations

import pytest
import torch
from tiny_model import make_tiny_checkpoint

from engine import LLM, SamplingParams
from engine.attention import causal_attention, paged_decode_attention, paged_prefill_attention

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3)


def make_llm(path, **kw) -> LLM:
    cfg = dict(dtype="float32", num_kv_blocks=256, block_size=4, max_num_seqs=8, num_threads=1)
    cfg.update(kw)
    return LLM(model=str(path), **cfg)


def prompts(n: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 399, (5 + 7 * i,), generator=g).tolist() for i in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_dir) -> list[list[int]]:
    """Each prompt alone, with a roomy cache: the undisturbed run."""
    llm = make_llm(tiny_dir)
    return [llm.generate([p], GREEDY)[0].token_ids for p in prompts()]


def test_greedy_equals_hf_dense_model(tiny_dir, reference):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # like ignore_eos: never stop, never suppress EOS
    for p, ours in zip(prompts(), reference, strict=True):
        ids = torch.tensor([p])
        with torch.inference_mode():
            gen = hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert gen[0, len(p) :].tolist() == ours
    assert len({tuple(r) for r in reference}) > 1  # the model does not emit one fixed string


def test_batched_continuous_equals_one_by_one(tiny_dir, reference):
    outs = make_llm(tiny_dir).generate(prompts(), GREEDY)
    assert [o.token_ids for o in outs] == reference


def test_static_policy_equals_continuous(tiny_dir, reference):
    outs = make_llm(tiny_dir, scheduling="static", max_num_seqs=4).generate(prompts(), GREEDY)
    assert [o.token_ids for o in outs] == reference


def test_chunked_prefill_equals_whole_prefill(tiny_dir, reference):
    llm = make_llm(tiny_dir, max_num_batched_tokens=7)
    outs = llm.generate(prompts(), GREEDY)
    assert [o.token_ids for o in outs] == reference


def test_preempted_and_resumed_requests_yield_same_tokens(tiny_dir, reference):
    # 14 blocks of 4 slots cannot hold six growing sequences: some get preempted.
    llm = make_llm(tiny_dir, num_kv_blocks=20, max_model_len=64)
    outs = llm.generate(prompts(), GREEDY)
    assert llm.engine.stats.preemptions > 0
    assert [o.token_ids for o in outs] == reference
    assert llm.engine.scheduler.allocator.num_used == 0


def test_prefix_cache_hits_yield_same_tokens_as_misses(tiny_dir):
    base = prompts(1)[0] * 4  # a long shared prefix
    variants = [base + [10 + i, 20 + i] for i in range(4)]
    cold = make_llm(tiny_dir, enable_prefix_caching=False)
    expected = [cold.generate([v], GREEDY)[0].token_ids for v in variants]
    warm = make_llm(tiny_dir)
    got = [warm.generate([v], GREEDY)[0].token_ids for v in variants]
    assert warm.engine.scheduler.prefix_hit_tokens >= 3 * (len(base) // 4) * 4
    assert got == expected


def test_paged_decode_attention_equals_dense():
    torch.manual_seed(0)
    b, h, kvh, d, bs, nblocks = 3, 6, 2, 16, 4, 32
    k_cache, v_cache = torch.randn(2, nblocks, bs, kvh, d).unbind(0)
    lens = torch.tensor([1, 9, 17], dtype=torch.int32)
    tables = torch.stack([torch.randperm(nblocks)[:5] for _ in range(b)])
    q = torch.randn(b, h, d)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, d**-0.5)
    for i in range(b):
        k = k_cache[tables[i]].reshape(-1, kvh, d)[: lens[i]].repeat_interleave(h // kvh, 1)
        v = v_cache[tables[i]].reshape(-1, kvh, d)[: lens[i]].repeat_interleave(h // kvh, 1)
        probs = torch.softmax(torch.einsum("hd,lhd->hl", q[i], k) * d**-0.5, dim=-1)
        torch.testing.assert_close(out[i], torch.einsum("hl,lhd->hd", probs, v))


def test_paged_prefill_chunk_equals_dense_causal():
    torch.manual_seed(1)
    h, kvh, d, bs, length, chunk = 4, 2, 8, 4, 11, 5
    k, v = torch.randn(length, kvh, d), torch.randn(length, kvh, d)
    q = torch.randn(length, h, d)
    k_cache, v_cache = torch.zeros(2, 16, bs, kvh, d).unbind(0)
    blocks = torch.tensor([7, 2, 12])
    for t in range(length):
        k_cache[blocks[t // bs], t % bs] = k[t]
        v_cache[blocks[t // bs], t % bs] = v[t]
    dense = causal_attention(q, k, v, d**-0.5)
    paged = paged_prefill_attention(q[-chunk:], k_cache, v_cache, blocks, length, d**-0.5)
    torch.testing.assert_close(paged, dense[-chunk:])
