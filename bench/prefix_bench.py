"""`splitserve bench prefix`: prefix-cache-aware prefill routing against random routing.

Workload: --groups groups, each a shared prefix of --prefix-tokens random token ids followed
by a unique --suffix-tokens suffix per request (token-id prompts, so every prompt has exactly
prefix + suffix tokens), --requests requests shuffled across the groups with --seed, sent at
most --concurrency at a time (or at a Poisson --request-rate), --max-tokens output each.

Each policy's server is `splitserve serve --prefill 2 --decode 1 --prefill-routing POLICY`,
started fresh per run, runs alternating (prefix, random, prefix, random, ...) to spread the
noise of a shared machine. Reported per policy: TTFT p50/p90/mean over all rounds, the
prefill workers' prefix-cache hit rate (sum prefix_hit_tokens / sum prefix_query_tokens from
/status after the run, minus the warm-up), and each worker's share of the looked-up tokens.

Cache sizing, the point of the workload: --kv-cache-gb (default: derived) sizes every
worker's KV cache so that one prefill worker holds about groups/2 + 1 prompts but not all
`groups`. Random routing then sends every group to both workers, and each worker's LRU cache
cycles through more prefixes than it holds (hits ~ capacity/groups once warm, and every
group is computed cold on both workers); prefix-aware routing partitions the groups, half a
worker each, which fits with room to spare, so after each group's first request almost every
prompt hits. The engine refuses a cache smaller than one max_model_len sequence (8,192
tokens for SmolLM2-135M), so with 1,000-token prefixes one worker holds at least 8 prompts:
hence 14 groups by default (8 prompts of 1,032 tokens = 8,256 tokens). The decode worker
gets the same cache, enough for --concurrency requests in flight.

    splitserve bench prefix                  # SmolLM2-135M, 14 groups x 1,000 tokens, 2 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
from pathlib import Path
from typing import Any

from bench import serve_bench, serve_metrics
from bench.serve_datasets import Sample
from bench.workloads import FIRST_PLAIN_TOKEN_ID
from engine.errors import InvalidRequestError

RESULT_JSON = Path("bench/results/prefix_routing.json")
POLICIES = ("prefix", "random")
PREFILL_WORKERS = 2
WARMUP_REQUESTS = 4  # short prompts, all at once, so each prefill worker likely runs one


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--groups", type=int, default=14, help="shared prefixes")
    p.add_argument("--prefix-tokens", type=int, default=1000)
    p.add_argument("--suffix-tokens", type=int, default=32, help="unique tail of each prompt")
    p.add_argument("--requests", type=int, default=None, help="per run (default: 4 per group)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at most")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson req/s")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="server runs per policy")
    p.add_argument(
        "--kv-cache-gb", type=float, default=None, help="per worker (default: groups/2+1 prompts)"
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    p.add_argument("--result-json", type=Path, default=RESULT_JSON)


def build_workload(
    groups: int, prefix_tokens: int, suffix_tokens: int, requests: int, vocab: int, seed: int
) -> list[tuple[int, list[int]]]:
    """(group, token ids) per request, shuffled. Group g's prefix starts with token
    FIRST_PLAIN_TOKEN_ID + g, so prefixes differ from the first block on."""
    rng = random.Random(seed)
    prefixes = [
        [FIRST_PLAIN_TOKEN_ID + g]
        + [rng.randrange(FIRST_PLAIN_TOKEN_ID, vocab) for _ in range(prefix_tokens - 1)]
        for g in range(groups)
    ]
    order = [i % groups for i in range(requests)]
    rng.shuffle(order)
    return [
        (
            g,
            prefixes[g]
            + [rng.randrange(FIRST_PLAIN_TOKEN_ID, vocab) for _ in range(suffix_tokens)],
        )
        for g in order
    ]


def _validate(args: argparse.Namespace) -> None:
    for name in ("groups", "prefix_tokens", "suffix_tokens", "concurrency", "max_tokens"):
        if getattr(args, name) <= 0:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be positive")
    for name in ("rounds", "block_size"):
        if getattr(args, name) <= 0:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be positive")
    if args.groups < 2:
        raise InvalidRequestError("--groups must be at least 2 (one per prefill worker)")
    if args.requests is None:
        args.requests = 4 * args.groups
    if args.requests < args.groups:
        raise InvalidRequestError(f"--requests must be at least --groups ({args.groups})")
    if not args.request_rate > 0:
        raise InvalidRequestError(f"--request-rate must be positive, got {args.request_rate}")
    if args.kv_cache_gb is not None and not args.kv_cache_gb > 0:
        raise InvalidRequestError(f"--kv-cache-gb must be positive, got {args.kv_cache_gb}")


def _model_facts(model: str) -> dict[str, int]:
    """Vocabulary, KV bytes per token (float32) and max_model_len, as the server will see them."""
    from engine.llm_engine import DEFAULT_MAX_MODEL_LEN
    from engine.loader import load_config, load_tokenizer, resolve_model

    path = resolve_model(model)
    c = load_config(path)
    return {
        "vocab": min(c.vocab_size, load_tokenizer(path).vocab_size),
        "kv_bytes_per_token": 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4,
        "max_model_len": min(DEFAULT_MAX_MODEL_LEN, c.max_position_embeddings),
    }


def plan_cache(args: argparse.Namespace, facts: dict[str, int]) -> dict[str, Any]:
    """The per-worker KV cache: --kv-cache-gb, or groups/2+1 prompts (at least one
    max_model_len sequence); an error unless it holds fewer than all the groups' prompts."""
    bs, prompt = args.block_size, args.prefix_tokens + args.suffix_tokens
    if prompt + args.max_tokens > facts["max_model_len"]:
        raise InvalidRequestError(f"prompts of {prompt} tokens exceed max_model_len")
    if args.groups > facts["vocab"] - FIRST_PLAIN_TOKEN_ID:
        raise InvalidRequestError(
            f"--groups must be at most {facts['vocab'] - FIRST_PLAIN_TOKEN_ID}"
        )
    per_block = bs * facts["kv_bytes_per_token"]
    floor_blocks = -(-facts["max_model_len"] // bs)
    if args.kv_cache_gb is None:
        blocks = max(floor_blocks, (args.groups // 2 + 1) * -(-prompt // bs))
        gb = (blocks + 0.5) * per_block / 2**30
    else:
        gb, blocks = args.kv_cache_gb, int(args.kv_cache_gb * 2**30 // per_block)
    tokens = blocks * bs
    if tokens < facts["max_model_len"]:
        raise InvalidRequestError(
            f"--kv-cache-gb {gb:g} holds {tokens} tokens, less than one sequence of max_model_len "
            f"{facts['max_model_len']} (needs {floor_blocks * per_block / 2**30:.3f} or more)"
        )
    held = tokens / prompt
    if held >= args.groups:
        raise InvalidRequestError(
            f"one prefill worker's cache ({tokens} tokens) holds {held:.1f} prompts, all "
            f"{args.groups} groups: use --groups {math.floor(held) + 1} or more"
        )
    if args.concurrency * (prompt + args.max_tokens) > tokens:
        raise InvalidRequestError(
            f"the decode worker's cache cannot hold {args.concurrency} requests"
        )
    return {"kv_cache_gb": gb, "blocks": blocks, "tokens": tokens, "prompts_held": held}


def _prefill_counts(status: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {
        w["name"]: (w.get("prefix_hit_tokens", 0), w.get("prefix_query_tokens", 0))
        for w in status["workers"]
        if w["role"] == "prefill"
    }


def _send(base: str, args: argparse.Namespace, samples: list[Sample], rate: float) -> list[dict]:
    client_args = serve_bench.default_args(
        base_url=base,
        model=args.model,
        max_concurrency=args.concurrency,
        ignore_eos=True,
        timeout=args.request_timeout,
        no_progress=True,
    )
    delays = serve_bench.arrival_delays(len(samples), rate, 1.0, args.seed)
    records, _, _ = asyncio.run(serve_bench._run(client_args, samples, delays))
    return records


def _one_run(args: argparse.Namespace, policy: str, rnd: int, workload: list, gb: float) -> dict:
    from bench.server_process import ServerProcess

    serve = ["--model", args.model, "--prefill", str(PREFILL_WORKERS), "--decode", "1"]
    serve += ["--prefill-routing", policy, "--kv-cache-gb", f"{gb:.6f}"]
    serve += ["--block-size", str(args.block_size)]
    rng = random.Random(args.seed + 1000 * rnd + 1)
    warm = [
        Sample([rng.randrange(FIRST_PLAIN_TOKEN_ID, 200) for _ in range(2 * args.block_size)], 1)
        for _ in range(WARMUP_REQUESTS)
    ]
    samples = [Sample(ids, args.max_tokens, len(ids)) for _, ids in workload]
    with ServerProcess(*serve) as server:
        _send(server.base, args, warm, math.inf)
        before = _prefill_counts(server.status())
        records = _send(server.base, args, samples, args.request_rate)
        after = _prefill_counts(server.status())
    workers = {
        name: {"hit_tokens": hit - before[name][0], "query_tokens": query - before[name][1]}
        for name, (hit, query) in sorted(after.items())
    }
    ok = [r for r in records if r["success"]]
    return {
        "policy": policy,
        "round": rnd,
        "ttft_s": [serve_metrics.ttft(r) for r in ok],
        "failed": len(records) - len(ok),
        "errors": sorted({r["error"] for r in records if r["error"]})[:3],
        "workers": workers,
    }


def summarize(runs: list[dict]) -> dict[str, Any]:
    ttfts = [t for r in runs for t in r["ttft_s"] if t is not None]
    hit = sum(w["hit_tokens"] for r in runs for w in r["workers"].values())
    query = sum(w["query_tokens"] for r in runs for w in r["workers"].values())
    # per run: prompt tokens looked up on each prefill worker (how the policy split the work)
    split = [{n: w["query_tokens"] for n, w in r["workers"].items()} for r in runs]
    return {
        "ttft_ms": serve_metrics.stats_ms(ttfts),
        "hit_rate": hit / query if query else 0.0,
        "hit_tokens": hit,
        "query_tokens": query,
        "query_tokens_per_worker": split,
        "completed": len(ttfts),
        "failed": sum(r["failed"] for r in runs),
    }


def run(args: argparse.Namespace) -> int:
    _validate(args)
    facts = _model_facts(args.model)
    cache = plan_cache(args, facts)
    workload = build_workload(
        args.groups,
        args.prefix_tokens,
        args.suffix_tokens,
        args.requests,
        facts["vocab"],
        args.seed,
    )
    print(
        f"{args.groups} groups x {args.prefix_tokens}+{args.suffix_tokens} tokens, "
        f"{args.requests} requests, concurrency {args.concurrency}; KV cache "
        f"{cache['kv_cache_gb']:.3f} GB per worker = {cache['prompts_held']:.1f} prompts",
        flush=True,
    )
    runs = []
    for rnd in range(args.rounds):
        for policy in POLICIES:
            runs.append(_one_run(args, policy, rnd, workload, cache["kv_cache_gb"]))
            _print_run(runs[-1])
    policies = {p: summarize([r for r in runs if r["policy"] == p]) for p in POLICIES}
    ratio = _ratios(policies)
    _print_table(policies, ratio)
    config = {k: v for k, v in vars(args).items() if k != "func" and not callable(v)}
    config["result_json"] = str(args.result_json)
    config["request_rate"] = "inf" if math.isinf(args.request_rate) else args.request_rate
    doc: dict[str, Any] = {"config": config, "model": facts, "cache": cache, "policies": policies}
    doc["ttft_ratio_random_over_prefix"] = ratio
    doc["runs"] = runs
    args.result_json.parent.mkdir(parents=True, exist_ok=True)
    args.result_json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.result_json}")
    return 0


def _ratios(policies: dict[str, dict]) -> dict[str, float | None]:
    a, b = policies["random"]["ttft_ms"], policies["prefix"]["ttft_ms"]
    return {k: a[k] / b[k] if a[k] and b[k] else None for k in ("median", "p90", "mean")}


def _print_run(r: dict) -> None:
    ttfts = [t for t in r["ttft_s"] if t is not None]
    hit = sum(w["hit_tokens"] for w in r["workers"].values())
    query = sum(w["query_tokens"] for w in r["workers"].values())
    split = "/".join(str(w["query_tokens"]) for w in r["workers"].values())
    print(
        f"[{r['policy']} round {r['round']}] TTFT median "
        f"{serve_metrics.stats_ms(ttfts)['median'] or 0:.0f} ms, hit rate "
        f"{hit / max(1, query):.2f}, tokens looked up per worker {split}, failed {r['failed']}",
        flush=True,
    )
    for err in r["errors"]:
        print(f"  error: {err}")


def _print_table(policies: dict[str, dict], ratio: dict[str, float | None]) -> None:
    print(f"{'policy':<8}{'p50 ms':>10}{'p90 ms':>10}{'mean ms':>10}{'hit rate':>10}")
    for name, s in policies.items():
        t = s["ttft_ms"]
        cells = [
            f"{t[k]:>10.0f}" if t[k] is not None else f"{'-':>10}"
            for k in ("median", "p90", "mean")
        ]
        print(f"{name:<8}{''.join(cells)}{s['hit_rate']:>10.2f}")
    shown = ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items() if v is not None)
    print(f"TTFT random / prefix: {shown}")
