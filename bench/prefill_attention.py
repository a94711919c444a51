"""Prefill attention of one layer, torch's fused SDPA against the AMX kernel, side by side.

    python -m bench.prefill_attention [--threads 2] [--shapes 16x128 4x512 1x2048]

For each shape (prompts x tokens, the default model's 9 query and 3 KV heads of 64): q, k
and v as views of one fused projection, as the model passes them; the best of --repeat
calls of `engine.attention.batched_causal_attention` (torch), then of
`engine.cpu_attention.prefill_attention_cpu` (AMX).
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.attention import batched_causal_attention
from engine.cpu_attention import prefill_attention_cpu, prefill_kernel_applies


def best_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def one_shape(prompts: int, tokens: int, heads: tuple[int, int, int], repeat: int):
    """(torch ms, AMX ms) for `prompts` prompts of `tokens`, or None where the kernel does
    not apply."""
    h, kvh, d = heads
    t = prompts * tokens
    q, k, v = torch.randn(t, h + 2 * kvh, d).bfloat16().split([h, kvh, kvh], dim=1)
    if not prefill_kernel_applies(q, k):
        return None
    out = torch.empty(t, h, d, dtype=torch.bfloat16)
    starts, lens = [i * tokens for i in range(prompts)], [tokens] * prompts
    with torch.no_grad():
        sdpa = best_ms(lambda: batched_causal_attention(q, k, v, prompts, d**-0.5), repeat)
        amx = best_ms(lambda: prefill_attention_cpu(q, k, v, out, starts, lens, d**-0.5), repeat)
    return sdpa, amx


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", nargs="+", default=["16x128", "4x512", "1x2048"])
    p.add_argument("--heads", default="9,3,64", help="query heads, KV heads, head dim")
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    h, kvh, d = (int(x) for x in args.heads.split(","))
    print("| prompts x tokens | torch SDPA | AMX kernel | speed-up |\n| --- | --- | --- | --- |")
    for shape in args.shapes:
        prompts, tokens = (int(x) for x in shape.split("x"))
        times = one_shape(prompts, tokens, (h, kvh, d), args.repeat)
        if times is None:
            print("the AMX kernel does not apply here (no AMX, or no C++ kernels built)")
            return 1
        sdpa, amx = times
        print(f"| {prompts} x {tokens} | {sdpa:.2f} ms | {amx:.2f} ms | {sdpa / amx:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
