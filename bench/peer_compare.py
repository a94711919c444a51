"""`splitserve bench peer`: the same `bench serve` load on a peer server, then on one or more
splitserve configurations, one after another on the same machine; one column each.

    args --validate--> peer, [serve flags per column]   (bad options: one line, before any work)
      |
      | write_hf_copy(model, dtype) -> HF dir
      v
    peer (one of, never at the same time as splitserve):
      transformers: PeerServer      (transformers serve --continuous-batching; stops at EOS)
      vllm:         ensure_vllm_venv, VllmServer   (--ignore-eos allowed: fixed-length outputs)
      |
      v   for each --splitserve-args: ServerProcess(splitserve serve --model M --dtype D FLAGS)
    measure (warm-up request, then the load) -> side by side table (+ --result-json)
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from bench import serve_bench
from bench.hf_peer import DTYPE_CHOICES, PeerServer, default_hf_dir, write_hf_copy
from bench.server_process import ServerProcess
from bench.vllm_peer import (
    DEFAULT_KV_CACHE_GB,
    VllmServer,
    default_vllm_venv,
    ensure_vllm_venv,
    threads_bind,
)
from engine.errors import InvalidRequestError

PEERS = {"transformers": "transformers serve", "vllm": "vllm"}  # --peer: column title
OURS = "splitserve"
_SET_BY_PEER = ("--model", "--dtype", "--port", "--grpc-port", "--served-model-name")
_ROWS = (
    ("Successful requests", "completed", None, "{}"),
    ("Failed requests", "failed", None, "{}"),
    ("Total input tokens", "total_input_tokens", None, "{}"),
    ("Total output tokens", "total_output_tokens", None, "{}"),
    ("Request throughput (req/s)", "request_throughput", None, "{:.2f}"),
    ("Output token throughput (tok/s)", "output_throughput", None, "{:.2f}"),
    ("Mean TTFT (ms)", "ttft_ms", "mean", "{:.1f}"),
    ("Median TTFT (ms)", "ttft_ms", "median", "{:.1f}"),
    ("P99 TTFT (ms)", "ttft_ms", "p99", "{:.1f}"),
    ("Median TPOT (ms)", "tpot_ms", "median", "{:.1f}"),
    ("P99 TPOT (ms)", "tpot_ms", "p99", "{:.1f}"),
    ("Median ITL (ms)", "itl_ms", "median", "{:.1f}"),
    ("P99 ITL (ms)", "itl_ms", "p99", "{:.1f}"),
    ("Median E2E (ms)", "e2e_ms", "median", "{:.1f}"),
)


def add_peer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peer", default="transformers", choices=list(PEERS), help="the peer server")
    p.add_argument("--model", default="smollm2-135m", help="model name, .gguf file or HF dir")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES)
    p.add_argument(
        "--hf-dir", type=Path, default=None, help="default: bench/results/hf-MODEL-DTYPE"
    )
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument(
        "--request-rate", type=float, default=1.0, help="requests/s, Poisson (inf: all at once)"
    )
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--random-input-len", type=int, default=256, help="words per random prompt")
    p.add_argument("--random-output-len", type=int, default=64, help="max_tokens per request")
    p.add_argument("--seed", type=int, default=0, help="the prompts and arrivals (same for all)")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate max_tokens every time (--peer vllm only: transformers serve refuses it)",
    )
    p.add_argument(
        "--splitserve-args",
        action="append",
        default=None,
        help="extra `splitserve serve` flags, one string per splitserve column (repeatable): "
        '--splitserve-args="" --splitserve-args="--mode colocated"',
    )
    p.add_argument(
        "--peer-threads",
        type=int,
        default=None,
        help="the peer's threads: OMP_NUM_THREADS (transformers), cores 0..N-1 bound by "
        "VLLM_CPU_OMP_THREADS_BIND (vllm; default 0-1)",
    )
    p.add_argument(
        "--peer-kv-cache-gb",
        type=float,
        default=DEFAULT_KV_CACHE_GB,
        help="the peer's KV cache size (vllm: VLLM_CPU_KVCACHE_SPACE)",
    )
    p.add_argument(
        "--vllm-venv", type=Path, default=None, help="vLLM's own venv (default: .venv-vllm)"
    )
    p.add_argument("--result-json", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def parse_peer_args(argv: list[str]) -> argparse.Namespace:
    """`bench peer`'s options from `argv`, as the CLI parses them."""
    p = argparse.ArgumentParser(prog="splitserve bench peer")
    add_peer_args(p)
    return p.parse_args(argv)


def _serve_flags(text: str) -> list[str]:
    try:
        flags = shlex.split(text)
    except ValueError as exc:
        raise InvalidRequestError(f"--splitserve-args: {exc}") from None
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name in _SET_BY_PEER:
            raise InvalidRequestError(f"--splitserve-args cannot set {name}: bench peer sets it")
    return flags


def _validate(args: argparse.Namespace) -> list[list[str]]:
    """The `splitserve serve` flags of each --splitserve-args (one list per splitserve column);
    InvalidRequestError for bad options."""
    for name in ("num_prompts", "request_rate", "random_input_len", "random_output_len"):
        if not getattr(args, name) > 0:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be positive")
    if not args.peer_kv_cache_gb > 0:
        raise InvalidRequestError("--peer-kv-cache-gb must be positive")
    for name in ("max_concurrency", "peer_threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be positive")
    if args.ignore_eos and args.peer != "vllm":
        raise InvalidRequestError(
            f"--ignore-eos needs --peer vllm: {PEERS[args.peer]} refuses ignore_eos"
        )
    if args.vllm_venv is not None and args.peer != "vllm":
        raise InvalidRequestError("--vllm-venv needs --peer vllm")
    return [_serve_flags(text) for text in (args.splitserve_args or [""])]


def column_names(configs: list[list[str]]) -> list[str]:
    """One title per splitserve column: `splitserve` alone, else by serving mode, numbered
    where two share a mode."""
    if len(configs) == 1:
        return [OURS]
    modes = [_mode(flags) for flags in configs]
    return [
        f"{OURS} {mode}" if modes.count(mode) == 1 else f"{OURS} {mode} #{i}"
        for i, mode in enumerate(modes, 1)
    ]


def _mode(flags: list[str]) -> str:
    mode = "disaggregated"  # `splitserve serve`'s default
    for i, flag in enumerate(flags):
        if flag == "--mode" and i + 1 < len(flags):
            mode = flags[i + 1]
        elif flag.startswith("--mode="):
            mode = flag.split("=", 1)[1]
    return mode


def _workload(args: argparse.Namespace, base_url: str, model: str, **overrides: Any):
    """The `bench serve` options: text prompts (transformers serve takes no token ids), greedy;
    stop at EOS unless --ignore-eos."""
    options = {
        "base_url": base_url,
        "model": model,
        "endpoint": args.endpoint,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "seed": args.seed,
        "text_prompts": True,
        "temperature": 0.0,
        "ignore_eos": args.ignore_eos,
        "no_progress": args.no_progress,
    }
    return serve_bench.default_args(**{**options, **overrides})


def measure(name: str, base_url: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """One warm-up request (another seed: no prefix-cache hit), then the workload."""
    warm_up = _workload(
        args, base_url, model, num_prompts=1, seed=args.seed + 1, request_rate=float("inf"),
        no_progress=True,
    )  # fmt: skip
    summary = serve_bench.benchmark(warm_up)["summary"]
    if summary["failed"]:
        raise RuntimeError(f"{name}: the warm-up request failed: {summary['errors'][0]}")
    print(f"{name}: {args.num_prompts} requests at {args.request_rate} req/s")
    return serve_bench.benchmark(_workload(args, base_url, model))


def format_comparison(results: dict[str, dict[str, Any]]) -> str:
    """Side by side summaries, one column per server."""
    names = list(results)
    width = max(20, *(len(n) + 2 for n in names))
    lines = [f"{'':<34}" + "".join(f"{n:>{width}}" for n in names)]
    for title, key, stat, fmt in _ROWS:
        cells = []
        for name in names:
            value = results[name]["summary"][key]
            value = value[stat] if stat else value
            cells.append("-" if value is None else fmt.format(value))
        lines.append(f"{title:<34}" + "".join(f"{c:>{width}}" for c in cells))
    for name in names:
        lines += [f"{name} error: {err}" for err in results[name]["summary"]["errors"]]
    rule = "=" * len(lines[0])
    return "\n".join([rule, *lines, rule])


def _measure_peer(args: argparse.Namespace, hf_dir: Path) -> tuple[dict[str, Any], Path]:
    """The peer's result and its server log."""
    name = PEERS[args.peer]
    log_path = hf_dir.with_name(f"{hf_dir.name}-{args.peer}.log")
    if args.peer == "vllm":
        venv = ensure_vllm_venv(args.vllm_venv or default_vllm_venv())
        with VllmServer(
            venv, hf_dir, args.dtype, log_path, served_model_name=args.model,
            threads_bind=threads_bind(args.peer_threads), kv_cache_gb=args.peer_kv_cache_gb,
        ) as vllm:  # fmt: skip
            return measure(name, vllm.base, vllm.model, args), log_path
    options = {"kv_cache_gb": args.peer_kv_cache_gb, "threads": args.peer_threads}
    with PeerServer(hf_dir, args.dtype, log_path, **options) as peer:
        result = measure(name, peer.base, peer.model, args)
    if "CB: False" in peer.log() or "CB: True" not in peer.log():
        print(f"warning: transformers serve did not batch continuously; see {log_path}")
    return result, log_path


def run_peer_compare(args: argparse.Namespace) -> int:
    configs = _validate(args)
    hf_dir = args.hf_dir or default_hf_dir(args.model, args.dtype)
    print(f"HF copy of {args.model} ({args.dtype}): {hf_dir}")
    write_hf_copy(args.model, hf_dir, args.dtype)
    peer_result, log_path = _measure_peer(args, hf_dir)
    results = {PEERS[args.peer]: peer_result}
    for name, flags in zip(column_names(configs), configs, strict=True):
        with ServerProcess("--model", args.model, "--dtype", args.dtype, *flags) as server:
            results[name] = measure(name, server.base, args.model, args)
    print(format_comparison(results))
    for name, flags in zip(column_names(configs), configs, strict=True):
        print(f"{name}: splitserve serve {shlex.join(flags) or '(defaults)'}")
    totals = {r["summary"]["total_output_tokens"] for r in results.values()}
    if len(totals) > 1:
        print(f"note: the servers generated {sorted(totals)} tokens (EOS at other steps)")
    if args.result_json:
        out = {
            "peer": args.peer,
            "hf_dir": str(hf_dir),
            "peer_log": str(log_path),
            "splitserve_args": dict(zip(column_names(configs), configs, strict=True)),
        }
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps({**out, **results}, indent=2) + "\n")
        print(f"wrote {args.result_json}")
    return 0
