"""The model's fused elementwise paths give what HF's unfused ops give."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_kernels
from engine.attention import write_kv
from engine.config import ModelConfig
from engine.model import RMSNorm, RotaryEmbedding, apply_rope, silu_and_mul


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype  # transformers' LlamaRMSNorm.forward, op for op
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_rms_norm_equals_hf(dtype, rows):
    torch.manual_seed(rows)
    norm = RMSNorm(576, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576) * 0.2 + 1)
    x = (torch.randn(rows, 576) * 4).to(dtype)
    expected = _hf_rms_norm(x, norm.weight, norm.eps)
    if dtype == torch.bfloat16:
        torch.testing.assert_close(norm(x), expected, atol=0, rtol=0)
    else:  # one fused op: float32 rounding order differs by an ulp at most
        torch.testing.assert_close(norm(x), expected)


@pytest.mark.skipif(cpu_kernels.load() is None, reason="no C++ compiler: torch's ops serve")
@pytest.mark.parametrize("shape", [(1, 1536), (33, 1536), (5, 40)])
def test_bf16_silu_and_mul_is_the_fp32_result_rounded_once(shape):
    torch.manual_seed(shape[0])
    rows, inter = shape
    gate_up = (torch.randn(rows, 2 * inter) * 6).bfloat16()
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # far tails and zeros
    out = silu_and_mul(gate_up)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, inter)
    gate, up = gate_up.float().split(inter, dim=-1)
    exact = F.silu(gate) * up
    # one rounding of a value within a few fp32 ulps of the exact one: one bf16 step at most
    torch.testing.assert_close(out.float(), exact, atol=1e-30, rtol=2**-8)
    unfused = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # torch's bf16 ops round twice
    torch.testing.assert_close(out.float(), unfused.float(), atol=1e-30, rtol=2**-7)


def test_float32_silu_and_mul_is_torchs_ops():
    gate_up = torch.randn(3, 64)
    expected = F.silu(gate_up[:, :32]) * gate_up[:, 32:]
    torch.testing.assert_close(silu_and_mul(gate_up), expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 33])
def test_add_forward_is_hfs_residual_add_then_norm(dtype, rows):
    torch.manual_seed(rows)
    norm = RMSNorm(576, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576) * 0.2 + 1)
    x, residual = ((torch.randn(rows, 576) * 3).to(dtype) for _ in range(2))
    summed = x + residual  # HF: hidden = residual + hidden, in the model's dtype
    expected = _hf_rms_norm(summed, norm.weight, norm.eps)
    out, new_residual = norm.add_forward(x, residual.clone())
    torch.testing.assert_close(new_residual, summed, atol=0, rtol=0)
    # bf16 fused: its fp32 sum of squares may round the other way: one bf16 step at most
    tol = {"atol": 1e-6, "rtol": 2**-7} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out.float(), expected.float(), **tol)
    if dtype == torch.bfloat16:  # and nearly always exactly
        assert (out != expected).float().mean() < 0.01


@pytest.mark.skipif(cpu_kernels.load() is None, reason="no C++ compiler: torch's ops serve")
@pytest.mark.parametrize(("tokens", "head_dim"), [(1, 64), (37, 64), (100, 128), (3, 24)])
def test_bf16_rope_and_kv_write_equal_torchs_ops(tokens, head_dim):
    """The fused kernel ropes q and k exactly as apply_rope does (bf16, three roundings) and
    writes k and v to exactly the slots write_kv does, touching no other slot."""
    torch.manual_seed(tokens)
    heads, kv_heads, blocks, block_size = 9, 3, 20, 16
    rope = RotaryEmbedding(_rope_config(head_dim))
    positions = torch.randint(0, 2048, (tokens,))
    cos, sin = rope(positions, torch.bfloat16)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim) * 3).bfloat16()
    slots = torch.randperm(blocks * block_size)[:tokens]
    cache = torch.randn(2, blocks, block_size, kv_heads, head_dim).bfloat16()
    expected_kv, fused_kv = cache.clone(), cache.clone()

    view = qkv.view(tokens, heads + 2 * kv_heads, head_dim)
    qk = apply_rope(view[:, : heads + kv_heads], cos, sin)
    write_kv(expected_kv[0], expected_kv[1], qk[:, heads:], view[:, heads + kv_heads :], slots)

    fused = qkv.clone()
    cpu_kernels.load().rope_write_kv(
        fused, cos, sin, fused_kv[0], fused_kv[1], slots, heads, kv_heads
    )
    fused = fused.view_as(view)
    torch.testing.assert_close(fused[:, : heads + kv_heads], qk, atol=0, rtol=0)
    torch.testing.assert_close(fused[:, heads + kv_heads :], view[:, heads + kv_heads :])
    torch.testing.assert_close(fused_kv, expected_kv, atol=0, rtol=0)


@pytest.mark.skipif(cpu_kernels.load() is None, reason="no C++ compiler: torch's ops serve")
def test_rope_kv_write_rejects_a_slot_outside_the_cache():
    cache = torch.zeros(2, 4, 16, 1, 64).bfloat16()
    qkv = torch.zeros(1, 3 * 64).bfloat16()
    cos = torch.ones(1, 1, 64).bfloat16()
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.load().rope_write_kv(
            qkv, cos, cos, cache[0], cache[1], torch.tensor([64]), 1, 1
        )
    assert not cache.any()


def _rope_config(head_dim: int) -> ModelConfig:
    return ModelConfig(
        architecture="llama", vocab_size=32, hidden_size=head_dim * 9, intermediate_size=64,
        num_layers=1, num_heads=9, num_kv_heads=3, head_dim=head_dim, rms_norm_eps=1e-5,
        rope_theta=100000.0, rope_scaling=None, max_position_embeddings=2048,
        tie_word_embeddings=True, attention_bias=False,
    )  # fmt: skip


def _prefill_step(lengths_cached):
    """A step's attention metadata: prefill chunks of (query_len, cached tokens), adjacent,
    each over its own blocks of a 16-token-block cache."""
    from engine.attention import AttentionMetadata, PrefillChunkMeta

    prefills, slots, start, block = [], [], 0, 0
    for query_len, cached in lengths_cached:
        context = cached + query_len
        blocks = list(range(block, block + -(-context // 16)))
        block += len(blocks)
        prefills.append(PrefillChunkMeta(start, query_len, context, torch.tensor(blocks)))
        slots += [blocks[p // 16] * 16 + p % 16 for p in range(cached, context)]
        start += query_len
    return AttentionMetadata(slot_mapping=torch.tensor(slots), prefills=prefills), start, block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompts_of_one_length_share_a_call_with_the_same_result(dtype, monkeypatch):
    # 3 adjacent fresh prompts of 24 tokens go as one batched call; the 10-token prompt and the
    # chunk after 16 cached tokens stay alone: every row equals its prompt's own attention.
    # (torch's paths: where AMX is, bf16 fresh prompts go to its kernel, test_prefill_attention)
    from engine import attention
    from engine.attention import causal_attention, fresh_runs, paged_attention

    monkeypatch.setattr(attention, "prefill_kernel_applies", lambda q, k: False)

    chunks = [(24, 0), (24, 0), (24, 0), (10, 0), (8, 16), (24, 0)]
    meta, tokens, blocks = _prefill_step(chunks)
    assert [len(r) for r in fresh_runs(meta.prefills)] == [3, 1, 1, 1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(tokens, h, 64, generator=g).to(dtype) for h in (6, 2, 2))
    k_cache = torch.randn(blocks, 16, 2, 64, generator=g).to(dtype)
    v_cache = torch.randn(blocks, 16, 2, 64, generator=g).to(dtype)
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 0.125)
    for p in meta.prefills:
        rows = slice(p.query_start, p.query_start + p.query_len)
        if p.context_len == p.query_len:
            want = causal_attention(q[rows], k[rows], v[rows], 0.125)
        else:  # its context is the cache (its own K/V were written there)
            kc = k_cache[p.block_ids].view(-1, 2, 64)[: p.context_len]
            vc = v_cache[p.block_ids].view(-1, 2, 64)[: p.context_len]
            want = causal_attention(q[rows], kc, vc, 0.125)
        torch.testing.assert_close(out[rows], want, rtol=0, atol=0)
