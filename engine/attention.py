"""Attention over the paged KV cache: the torch reference, and the choice of kernel.

Decode: Triton on CUDA, else the C++ page-walking kernel (engine.cpu_attention), else torch.
Prefill: on a CPU with AMX, bf16, every chunk of the step in one AMX kernel call
(engine.cpu_attention.prefill_attention_cpu); else torch's SDPA, equal-length whole prompts
batched into one call.

Per layer the cache is `k_cache, v_cache: [num_blocks, block_size, KVH, D]`
(slices of the engine's `[layers, 2, blocks, block_size, KVH, D]` tensor).
A step's tokens are flattened to `[T]`: first the decode sequences (one token
each), then the prefill chunks. `AttentionMetadata` describes that layout and
is passed explicitly into every layer; nothing is kept in module state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.cpu_attention import (
    paged_decode_attention_cpu,
    prefill_attention_cpu,
    prefill_kernel_applies,
)


@dataclass(slots=True)
class PrefillChunkMeta:
    query_start: int  # index of the chunk's first token in the flat batch
    query_len: int
    context_len: int  # tokens of KV the chunk attends to, its own included
    block_ids: torch.Tensor  # [ceil(context_len / block_size)] int64


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) per token
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, max_blocks] int64
    decode_context_lens: torch.Tensor | None = None  # [num_decodes] int32
    prefills: list[PrefillChunkMeta] = field(default_factory=list)
    use_triton: bool = False


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    # k, v: [T, KVH, D] -> cache slots
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v)


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    context_lens: torch.Tensor,  # [B]
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    """One gather of each sequence's pages (index_select: a row copy per block), then SDPA
    on strided views of it: no transposed copy of K or V, no [B, H, L] scores in Python."""
    b, h, d = q.shape
    kvh, bs = k_cache.shape[2], k_cache.shape[1]
    flat = block_tables.reshape(-1).long()
    length = block_tables.shape[1] * bs
    k = k_cache.index_select(0, flat).view(b, length, kvh, d).transpose(1, 2)  # [B, KVH, L, D]
    v = v_cache.index_select(0, flat).view(b, length, kvh, d).transpose(1, 2)
    live = torch.arange(length, device=q.device)[None, :] < context_lens[:, None].to(q.device)
    out = F.scaled_dot_product_attention(
        q.view(b, h, 1, d), k, v, attn_mask=live[:, None, None, :], scale=scale, enable_gqa=True
    )  # [B, H, 1, D]
    return out.view(b, h, d)


def paged_prefill_attention(
    q: torch.Tensor,  # [S, H, D] the chunk's queries, positions context_len-S .. context_len-1
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,  # [ceil(context_len / block_size)]
    context_len: int,
    scale: float,
) -> torch.Tensor:  # [S, H, D]
    s, _, d = q.shape
    kvh = k_cache.shape[2]
    k = k_cache[block_ids].view(-1, kvh, d)[:context_len]  # [L, KVH, D]
    v = v_cache[block_ids].view(-1, kvh, d)[:context_len]
    return causal_attention(q, k, v, scale)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """q: [S, H, D] are the last S positions of k, v: [L, KVH, D]. The inputs go in 4-D
    ([1, heads, S|L, D]): with 3-D ones torch's SDPA falls back to its math path on CPU (a
    bmm, a masked softmax and a bmm in separate ops), 5.7x slower than the fused kernel for
    one 128-token bf16 prompt of the default model."""
    s, length = q.shape[0], k.shape[0]
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H|KVH, S|L, D]
    if s == length:
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        q_pos = torch.arange(length - s, length, device=q.device)[:, None]
        allowed = torch.arange(length, device=q.device)[None, :] <= q_pos  # [S, L]
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=allowed, scale=scale, enable_gqa=True
        )
    return out[0].transpose(0, 1)


def _decode(q, k_cache, v_cache, tables, lens, scale: float, use_triton: bool) -> torch.Tensor:
    """The fastest decode attention that applies: Triton on CUDA, the C++ page-walking
    kernel for float32 and bfloat16 on CPU (engine.cpu_attention), else the torch gather +
    SDPA."""
    if use_triton:
        from engine.triton_attention import paged_decode_attention_triton

        return paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, scale)
    out = paged_decode_attention_cpu(q, k_cache, v_cache, tables, lens, scale)
    if out is None:
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    return out


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_written: bool = False,  # the caller wrote k and v to their slots (a fused kernel)
) -> torch.Tensor:  # [T, H, D]
    if not kv_written:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    nd = meta.num_decodes
    if nd and nd == q.shape[0]:  # decode only: the kernel's output is the result, no copy
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        return _decode(
            q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale,
            meta.use_triton,
        )  # fmt: skip
    out = torch.empty_like(q)
    if nd:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        out[:nd] = _decode(
            q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale,
            meta.use_triton,
        )  # fmt: skip
    if meta.prefills and prefill_kernel_applies(q, k_cache):  # every chunk in one AMX call,
        chunks = [(p.query_start, p.query_len, p.context_len, p.block_ids) for p in meta.prefills]
        prefill_attention_cpu(q, k_cache, v_cache, out, chunks, scale)  # K, V read from pages
        return out
    for group in fresh_runs(meta.prefills):
        p = group[0]
        rows = slice(p.query_start, p.query_start + p.query_len * len(group))
        if len(group) > 1:  # same-length prompts, adjacent: one call for all of them
            out[rows] = batched_causal_attention(q[rows], k[rows], v[rows], len(group), scale)
        elif p.context_len == p.query_len:  # nothing cached before the chunk: its own K/V
            out[rows] = causal_attention(q[rows], k[rows], v[rows], scale)
        else:
            out[rows] = paged_prefill_attention(
                q[rows], k_cache, v_cache, p.block_ids, p.context_len, scale
            )
    return out


def fresh_runs(prefills: list[PrefillChunkMeta]) -> list[list[PrefillChunkMeta]]:
    """The step's prefill chunks in order, adjacent whole prompts of one length (nothing
    cached before them) grouped: a wave of equal prompts is one attention call a layer, not
    one per prompt (16 prompts of 128 tokens, bf16, 2 threads: 2.1 vs 4.2 ms a layer)."""
    runs: list[list[PrefillChunkMeta]] = []
    for p in prefills:
        last = runs[-1][-1] if runs else None
        if (
            last is not None
            and p.context_len == p.query_len == last.query_len == last.context_len
            and p.query_start == last.query_start + last.query_len
        ):
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def batched_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompts: int, scale: float
) -> torch.Tensor:
    """causal_attention of `prompts` adjacent prompts of one length S in one call: q, k, v
    [prompts * S, heads, D] viewed (not copied) as [prompts, heads, S, D]."""
    t, h, d = q.shape
    qh, kh, vh = (x.view(prompts, t // prompts, -1, d).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(t, h, d)
