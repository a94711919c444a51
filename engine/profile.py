"""A worker's capacity, measured on its own engine when it starts: what the SLO autoscaler
(planner.capacity) turns load into worker counts with.

    prefill: prompt tokens per second for one prompt of each of `prompt_lens` tokens
    decode:  seconds per step with `batch` sequences decoding at `context` tokens each

Random token ids, greedy, EOS ignored; every request is aborted after, so the engine is
left as it was (the caller runs this before the worker takes traffic). Batches that the
KV cache cannot hold are skipped.
"""

from __future__ import annotations

import random
import time
from typing import Any

from engine.sampling_params import SamplingParams

PROMPT_LENS = (256,)
DECODE_BATCHES = (1, 8, 32)
CONTEXT = 64
STEPS = 3


def _ids(n: int, vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(n)]


def _room_tokens(engine: Any) -> int:
    alloc = engine.scheduler.allocator
    return int(0.8 * alloc.num_free * engine.config.block_size)


def profile(engine: Any, prompt_lens=PROMPT_LENS, batches=DECODE_BATCHES,
            context: int = CONTEXT, seed: int = 0) -> dict[str, dict[int, float]]:  # fmt: skip
    """{"prefill_tokens_per_s": {prompt_len: tok/s}, "decode_step_s": {batch: s}}."""
    if engine.has_unfinished():
        raise RuntimeError("profile an idle engine")
    rng, vocab = random.Random(seed), engine.model_config.vocab_size
    limit = min(engine.max_model_len - STEPS - 2, engine.config.max_num_batched_tokens)
    prefill: dict[int, float] = {}
    for n in prompt_lens:
        n = min(n, limit)
        if n < 1 or n + 1 > _room_tokens(engine) or n in prefill:
            continue
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        engine.add_request("profile-prefill", _ids(n, vocab, rng), params)
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        prefill[n] = n / (time.perf_counter() - t0)
    decode: dict[int, float] = {}
    ctx = max(1, min(context, limit))
    for batch in batches:
        if batch > engine.config.max_num_seqs or batch * (ctx + STEPS + 2) > _room_tokens(engine):
            continue
        prompts = [_ids(ctx, vocab, rng) for _ in range(batch)]
        decode[batch] = median_decode_step_s(engine, prompts, f"profile-decode-{batch}")
    return {"prefill_tokens_per_s": prefill, "decode_step_s": decode}


def median_decode_step_s(
    engine: Any, prompts: list[list[int]], tag: str, warmup: int = 0, steps: int = STEPS
) -> float:
    """Median seconds of `steps` engine steps while every prompt decodes (after their
    prefill and `warmup` steps); the requests are aborted after."""
    params = SamplingParams(max_tokens=warmup + steps + 2, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    started: set[str] = set()
    while len(started) < len(ids):  # prefill (chunked, maybe over several steps)
        started.update(o.request_id for o in engine.step())
    for _ in range(warmup):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    for rid in ids:
        engine.abort(rid)
    return sorted(times)[len(times) // 2]
