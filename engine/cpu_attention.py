"""CPU attention kernels: paged decode for float32 and bfloat16, reading K and V out of the
pages, and AMX prefill.

The torch path (engine.attention.paged_decode_attention) gathers each sequence's pages into
a contiguous copy and runs SDPA on it: K and V are read twice and written once per layer.
This kernel walks the block table and reads each K and V row once:

    for each (sequence b, KV head h) in parallel (torch's intra-op threads):
        s[g, t] = scale * q[b, h*G + g] . K[page(t), slot(t), h]     t < context_len[b]
        p = softmax_t(s)                                              (max-subtracted, fp32)
        out[b, h*G + g] = sum_t p[g, t] * V[page(t), slot(t), h]

It is C++ (csrc/paged_decode.cpp: AVX-512 for head dims 64 and 128, portable loops for the
rest), built by engine.cpu_kernels; where it cannot be built the torch path is used.

Prefill in bf16 on a CPU with AMX: `prefill_attention_cpu` (csrc/prefill_attention.cpp,
flash attention on AMX tiles over the paged cache), every chunk of a step (whole prompts and
chunks after a cached prefix) in one call a layer; elsewhere torch's SDPA (engine.attention).
"""

from __future__ import annotations

import torch

from engine import cpu_kernels

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # bf16 K/V are widened to fp32 row by row


def applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """float32 or bfloat16 on CPU with a contiguous cache: what the kernel handles."""
    return (
        q.device.type == "cpu"
        and q.dtype == k_cache.dtype
        and k_cache.dtype in KERNEL_DTYPES
        and k_cache.is_contiguous()
    )


def paged_decode_attention_cpu(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    context_lens: torch.Tensor,  # [B]
    scale: float,
) -> torch.Tensor | None:  # [B, H, D]; None: the kernel does not apply or is not built
    if not (applies(q, k_cache) and v_cache.is_contiguous()):
        return None
    kernel = cpu_kernels.load()
    if kernel is None:
        return None
    if not torch.autograd.profiler._is_profiler_enabled:  # entering a record_function
        return kernel.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    # costs ~70 us even with no profiler on (2 ms a step): named in profiles only
    with torch.profiler.record_function("splitserve::paged_decode_cpu"):
        return kernel.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)


def prefill_kernel_applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """bf16 on a CPU whose AMX this process may use, head dim 64 or 128, whole rows, a
    contiguous cache: what csrc/prefill_attention.cpp handles (else torch's SDPA serves)."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or k_cache.dtype != torch.bfloat16:
        return False
    if q.shape[-1] not in (64, 128) or q.stride(-1) != 1 or not k_cache.is_contiguous():
        return False
    kernel = cpu_kernels.load()
    return kernel is not None and bool(kernel.amx_available())


def prefill_attention_cpu(
    q: torch.Tensor,  # [T, H, D] bf16 (a view of the fused projection is fine)
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]: the chunks' K written already
    v_cache: torch.Tensor,
    out: torch.Tensor,  # [T, H, D]: the chunks' rows are written
    chunks: list[tuple[int, int, int, torch.Tensor]],  # (first row, rows, context, block ids)
    scale: float,
) -> None:
    """Causal attention of prefill chunks in one call: a chunk's rows are the last positions
    of its context (its cached tokens, then its own), read from the pages of its block table.
    Check `prefill_kernel_applies` first. A layer of the default model (head dim 64, 2
    threads), torch's fused SDPA -> this kernel: 16 prompts of 128 tokens 1.25 -> 0.96 ms, 4
    of 512 3.18 -> 1.82 ms, one of 2,048 8.11 -> 5.51 ms (its softmax, not the tiles, bounds
    it; `python -m bench.prefill_attention`)."""
    kernel = cpu_kernels.load()
    assert kernel is not None
    starts, lens, ctx = ([c[i] for c in chunks] for i in range(3))
    tables = [c[3].to(torch.int64).contiguous() for c in chunks]
    args = (q, k_cache, v_cache, out, starts, lens, ctx, tables, scale)
    if not torch.autograd.profiler._is_profiler_enabled:
        kernel.prefill_attention(*args)
        return
    with torch.profiler.record_function("splitserve::prefill_attention_cpu"):
        kernel.prefill_attention(*args)
