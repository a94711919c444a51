"""`splitserve bench kv` and `splitserve bench ttft`: the disaggregation costs, measured.

kv:   KV-transfer bandwidth over gRPC on loopback vs a raw TCP socket moving the same bytes.
ttft: time to first token at low load (one request at a time), colocated vs disaggregated
      with layer-wise KV streaming on and off, each server started as `splitserve serve`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from engine.errors import InvalidRequestError

RESULTS_DIR = Path("bench/results")
TTFT_CONFIGS = {
    "colocated": ["--mode", "colocated"],
    "disaggregated": ["--mode", "disaggregated"],
    "disaggregated-no-layerwise": ["--mode", "disaggregated", "--no-layerwise"],
}


def add_kv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mib", type=int, default=256, help="bytes to move, in MiB")
    p.add_argument("--result-json", type=Path, default=RESULTS_DIR / "kv_bandwidth.json")


def run_kv(args: argparse.Namespace) -> int:
    from bench.kv_bandwidth import measure_grpc_bandwidth

    if args.mib <= 0:
        raise InvalidRequestError("--mib must be positive")
    result = measure_grpc_bandwidth(args.mib << 20)
    print(
        f"KV transfer over {args.mib} MiB on loopback: gRPC {result['grpc_gbps']:.2f} GB/s, "
        f"raw socket {result['socket_gbps']:.2f} GB/s, ratio {result['ratio']:.2f} "
        f"(goal >= 0.50)\n"
        f"bare gRPC stream of the same bytes (grpcio's own ceiling): "
        f"{result['bare_grpc_gbps']:.2f} GB/s = {result['bare_ratio']:.2f} of the socket; "
        f"the KV transport runs at {result['of_bare']:.2f} of it"
    )
    _write(args.result_json, result)
    return 0


def add_ttft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", default=",".join(TTFT_CONFIGS))
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--result-json", type=Path, default=RESULTS_DIR / "ttft.json")


def run_ttft(args: argparse.Namespace) -> int:
    from bench.server_process import ServerProcess

    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in TTFT_CONFIGS]
    if unknown:
        raise InvalidRequestError(
            f"unknown config {unknown[0]!r}; choose from {', '.join(TTFT_CONFIGS)}"
        )
    if args.requests <= 0 or args.prompt_tokens <= 0:
        raise InvalidRequestError("--requests and --prompt-tokens must be positive")
    results = {}
    for name in configs:
        print(f"[{name}] starting splitserve serve ...", flush=True)
        with ServerProcess(*TTFT_CONFIGS[name], "--dtype", args.dtype) as server:
            samples = _measure_ttft(server.base, args.prompt_tokens, args.warmup, args.requests)
        results[name] = _summary(samples)
        print(
            f"[{name}] TTFT median {results[name]['median_ms']:.1f} ms, "
            f"p90 {results[name]['p90_ms']:.1f} ms over {len(samples)} requests",
            flush=True,
        )
    base = results.get("colocated")
    for name, r in results.items():
        if base and name != "colocated":
            r["vs_colocated"] = r["median_ms"] / base["median_ms"]
            print(f"{name}: median TTFT {r['vs_colocated']:.2f}x colocated (goal <= 1.10)")
    _write(
        args.result_json,
        {"prompt_tokens": args.prompt_tokens, "dtype": args.dtype, "results": results},
    )
    return 0


def _measure_ttft(base: str, prompt_tokens: int, warmup: int, n: int) -> list[float]:
    import httpx

    samples = []
    with httpx.Client(timeout=300) as client:
        for i in range(warmup + n):
            # Token-id prompts: the same length every time, distinct so no prefix-cache hit.
            prompt = [(i * 7919 + j * 31) % 40000 + 1000 for j in range(prompt_tokens)]
            body = {
                "model": "smollm2-135m",
                "prompt": prompt,
                "max_tokens": 2,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            }
            start = time.perf_counter()
            first = None
            with client.stream("POST", base + "/v1/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.perf_counter() - start
            if i >= warmup and first is not None:
                samples.append(first)
    return samples


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(ordered) * 1e3,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
        "n": float(len(ordered)),
    }


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
