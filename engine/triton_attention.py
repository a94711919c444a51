"""Triton paged decode attention: one new query token per sequence against its paged KV cache.

Grid: one program per (sequence b, kv head). The program loads the query rows of every query head
that shares this kv head (the GQA group, padded to ``GROUP_PAD >= 16`` rows so ``tl.dot`` applies;
padding rows read zeros and are never stored), then walks the sequence's block table one KV block
at a time, so each K/V block is read once for the whole group:

    for block i in 0 .. cdiv(context_len, block_size):
        k, v   = cache[block_tables[b, i], :, kv_head]       # [S, D], tokens past context masked
        s      = q @ k^T * scale                             # [G, S], masked tokens -> -inf
        m_new  = max(m, rowmax(s))                           # running row max
        p      = exp(s - m_new)
        l      = l * exp(m - m_new) + rowsum(p)              # running softmax denominator
        acc    = acc * exp(m - m_new) + p @ v                # running numerator, [G, D]
        m      = m_new
    out = acc / l

This is the online softmax of FlashAttention: the max, denominator and accumulator are kept in
fp32 and rescaled whenever the running max grows, so the result equals softmax(q k^T) v without
ever holding all scores. ``context_len >= 1`` guarantees every visited block has a valid token, so
the running max is finite after the first block.

The kernel is jit-decorated lazily on first call. ``TRITON_INTERPRET=1`` (the CPU tests) must be
set before triton is first imported: triton.language's own helpers (tl.sum, tl.max, tl.zeros) are
jit functions decorated at import. Under the interpreter both dots run in fp32 (``DOT_FP32``):
triton 3.9's interpreter multiplies the raw bit patterns of bf16 operands in ``tl.dot``. Compiled,
the dots take the cache dtype (tensor cores for bf16/fp16, ``ieee`` fp32 for fp32) with fp32
accumulation.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None
    tl = None

_MIN_DOT_ROWS = 16  # tl.dot needs every dimension >= 16


def triton_available() -> bool:
    """True when triton imports; whether it can launch still needs CUDA or TRITON_INTERPRET=1."""
    return triton is not None


def _interpret_mode() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_btb,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)
    s = tl.arange(0, BLOCK_SIZE)
    d = tl.arange(0, HEAD_DIM)
    g_mask = g < GROUP
    heads = kv_head * GROUP + g

    # q: [G, D]
    q_offs = b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=g_mask[:, None], other=0.0)
    dot_dtype = tl.float32 if DOT_FP32 else k_ptr.dtype.element_ty
    q = q.to(dot_dtype)
    context_len = tl.load(context_lens_ptr + b)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for i in range(0, tl.cdiv(context_len, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + b.to(tl.int64) * stride_btb + i).to(tl.int64)
        tok_mask = i * BLOCK_SIZE + s < context_len
        # k, v: [S, D]
        k_offs = block * stride_kb + s[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
        k = tl.load(k_ptr + k_offs, mask=tok_mask[:, None], other=0.0).to(dot_dtype)
        v_offs = block * stride_vb + s[:, None] * stride_vs + kv_head * stride_vh + d[None, :]
        v = tl.load(v_ptr + v_offs, mask=tok_mask[:, None], other=0.0).to(dot_dtype)

        # scores, p: [G, S]
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        scores = tl.where(tok_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), v, input_precision="ieee")
        m_i = m_new

    out = acc / l_i[:, None]
    out_offs = b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


@functools.cache
def _kernel() -> Any:
    return triton.jit(_paged_decode_kernel)


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention over a paged KV cache.

    q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D];
    block_tables: [B, max_blocks] int32 (entries past a sequence's blocks are ignored);
    context_lens: [B] int32, >= 1, including the current token already in the cache.
    Returns [B, H, D] in q's dtype.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if v_cache.shape != k_cache.shape or cache_head_dim != head_dim:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k_cache.shape}, v {v_cache.shape}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads} query heads not divisible by {num_kv_heads} kv heads")
    if head_dim & (head_dim - 1) or block_size & (block_size - 1) or block_size < _MIN_DOT_ROWS:
        raise ValueError(f"head_dim {head_dim}, block_size {block_size}: need powers of 2, >= 16")

    q = q if q.stride(-1) == 1 else q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:  # copying a cache would cost GBs
        raise ValueError("k_cache and v_cache need a contiguous head_dim")
    block_tables = block_tables.to(torch.int32).contiguous()
    context_lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    # out: [B, H, D]

    group = num_heads // num_kv_heads
    group_pad = max(_MIN_DOT_ROWS, triton.next_power_of_2(group))
    grid = (batch, num_kv_heads)
    interpret = _interpret_mode()
    _kernel()[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        # The triton 3.9 interpreter multiplies bf16 bit patterns in tl.dot, so it gets fp32.
        DOT_FP32=interpret,
    )
    return out
