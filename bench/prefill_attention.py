"""Prefill attention of one layer, torch's paths against the AMX kernel, side by side.

    python -m bench.prefill_attention [--threads 2] [--shapes 16x128 4x512 1x2048 1x512+1024]

A shape is PROMPTSxTOKENS (whole prompts) or PROMPTSxTOKENS+CACHED (chunks of TOKENS after
CACHED tokens in the cache, as after a prefix-cache hit or a long prompt's first chunk); the
default model's 9 query and 3 KV heads of 64. q is a view of one fused projection, as the
model passes it; K and V sit in a paged cache. Torch: `engine.attention`'s
batched_causal_attention (whole prompts) or paged_prefill_attention (each chunk); AMX:
`engine.cpu_attention.prefill_attention_cpu`, every chunk in one call. Best of --repeat calls
of each.
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.attention import batched_causal_attention, paged_prefill_attention
from engine.cpu_attention import prefill_attention_cpu, prefill_kernel_applies


def best_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def one_shape(shape: str, heads: tuple[int, int, int], repeat: int):
    """(torch ms, AMX ms) for one shape, or None where the kernel does not apply."""
    h, kvh, d = heads
    size, _, cached_s = shape.partition("+")
    prompts, tokens = (int(x) for x in size.split("x"))
    cached, bs = int(cached_s or 0), 16
    ctx = cached + tokens
    per = -(-ctx // bs)  # blocks a chunk's context takes
    q = torch.randn(prompts * tokens, h + 2 * kvh, d).bfloat16()[:, :h]
    k_cache, v_cache = torch.randn(2, prompts * per, bs, kvh, d).bfloat16().unbind(0)
    if not prefill_kernel_applies(q, k_cache):
        return None
    tables = [torch.arange(i * per, (i + 1) * per) for i in range(prompts)]
    chunks = [(i * tokens, tokens, ctx, tables[i]) for i in range(prompts)]
    out = torch.empty(prompts * tokens, h, d, dtype=torch.bfloat16)
    k_rows, v_rows = (c.view(-1, kvh, d)[: prompts * tokens] for c in (k_cache, v_cache))

    def torch_path():
        if not cached:
            return batched_causal_attention(q, k_rows, v_rows, prompts, d**-0.5)
        for start, n, c, table in chunks:
            rows = slice(start, start + n)
            out[rows] = paged_prefill_attention(q[rows], k_cache, v_cache, table, c, d**-0.5)
        return out

    with torch.no_grad():
        sdpa = best_ms(torch_path, repeat)
        amx = best_ms(
            lambda: prefill_attention_cpu(q, k_cache, v_cache, out, chunks, d**-0.5), repeat
        )
    return sdpa, amx


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", nargs="+", default=["16x128", "4x512", "1x2048", "1x512+1024"])
    p.add_argument("--heads", default="9,3,64", help="query heads, KV heads, head dim")
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    h, kvh, d = (int(x) for x in args.heads.split(","))
    print(
        "| prompts x tokens (+ cached) | torch | AMX kernel | speed-up |\n| --- | --- | --- | --- |"
    )
    for shape in args.shapes:
        times = one_shape(shape, (h, kvh, d), args.repeat)
        if times is None:
            print("the AMX kernel does not apply here (no AMX, or no C++ kernels built)")
            return 1
        sdpa, amx = times
        print(f"| {shape} | {sdpa:.2f} ms | {amx:.2f} ms | {sdpa / amx:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
