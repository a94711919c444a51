"""`splitserve bench offline`: continuous vs static, vs HF transformers, roofline, KV waste.

args ──> BenchPlan (workloads: fixed random prompts, capped-exponential lengths)
     ──> experiments (in a fixed order, sharing the continuous runs)
     ──> JSON (--result-json), PNG (--plot), summary table on stdout
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench import experiments
from bench.report import format_summary, result_json_text
from bench.splitserve_run import EngineSettings
from bench.workloads import make_workload, random_prompts
from engine.errors import InvalidRequestError

EXPERIMENTS = ("continuous_vs_static", "kv_waste", "vs_hf", "roofline")
RESULTS_DIR = Path("bench/results")

# name -> (full default, --quick default); an explicit flag wins over both.
SIZES = {
    "batch_size": (32, 8),
    "num_requests": (64, 16),
    "prompt_len": (128, 32),
    "mean_len": (128.0, 32.0),
    "caps": ("32,128,512", "16,64"),
    "roofline_batches": ("1,8,32,64", "1,8"),
    "roofline_steps": (12, 4),
}


def add_offline_args(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument(
        "--experiments",
        default=",".join(EXPERIMENTS),
        help=f"comma-separated subset of: {', '.join(EXPERIMENTS)}",
    )
    p.add_argument("--model", default="smollm2-135m", help="model name, .gguf file or HF dir")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="max_num_seqs of both schedulers and HF's padded batch (32)",
    )
    p.add_argument("--num-requests", type=int, default=None, help="requests per workload (64)")
    p.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (128)")
    p.add_argument("--mean-len", type=float, default=None, help="mean output length (128)")
    p.add_argument("--caps", default=None, help="output length caps (32,128,512)")
    p.add_argument("--roofline-batches", default=None, help="decode batch sizes (1,8,32,64)")
    p.add_argument("--roofline-steps", type=int, default=None, help="timed decode steps (12)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gb", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument(
        "--quick", action="store_true", help="small sizes for a smoke run (a few minutes)"
    )
    p.add_argument("--result-json", type=Path, default=RESULTS_DIR / "offline.json")
    p.add_argument("--plot", type=Path, default=RESULTS_DIR / "offline.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidRequestError(
            f"{flag} must be comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise InvalidRequestError(f"{flag} must list positive integers, got {text!r}")
    return values


def _size(args: argparse.Namespace, name: str):
    value = getattr(args, name)
    return SIZES[name][1 if args.quick else 0] if value is None else value


def selected_experiments(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        raise InvalidRequestError(
            f"unknown experiment(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(EXPERIMENTS)}"
        )
    return [n for n in EXPERIMENTS if n in names]  # the fixed order shares runs


def build_plan(args: argparse.Namespace, vocab_size: int) -> experiments.BenchPlan:
    for flag in ("batch_size", "block_size", "num_requests", "prompt_len", "roofline_steps"):
        value = _size(args, flag) if flag in SIZES else getattr(args, flag)
        if value <= 0:
            raise InvalidRequestError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    mean = _size(args, "mean_len")
    if not mean > 0 or args.kv_cache_gb <= 0 or (args.threads is not None and args.threads <= 0):
        raise InvalidRequestError("--mean-len, --kv-cache-gb and --threads must be positive")
    caps = tuple(sorted(set(_ints(_size(args, "caps"), "--caps"))))
    prompts = random_prompts(
        _size(args, "num_requests"), _size(args, "prompt_len"), vocab_size, args.seed
    )
    # The same seed for every cap: a request's length differs only by the cap applied to it.
    workloads = tuple(make_workload(f"cap{c}", prompts, mean, c, args.seed + 1) for c in caps)
    settings = EngineSettings(
        args.model, args.dtype, args.block_size, args.threads, args.kv_cache_gb
    )
    return experiments.BenchPlan(
        settings=settings,
        batch_size=_size(args, "batch_size"),
        workloads=workloads,
        caps=caps,
        roofline_batches=_ints(_size(args, "roofline_batches"), "--roofline-batches"),
        roofline_prompt_len=_size(args, "prompt_len"),
        roofline_warmup=2,
        roofline_steps=_size(args, "roofline_steps"),
        seed=args.seed,
        quick=args.quick,
        progress=not args.no_progress,
    )


def run_offline_bench(args: argparse.Namespace) -> int:
    import torch

    from bench.roofline import machine_info
    from engine.loader import load_config, resolve_model

    names = selected_experiments(args.experiments)
    plan = build_plan(args, load_config(resolve_model(args.model)).vocab_size)
    if args.threads:
        torch.set_num_threads(args.threads)  # the HF baseline and the peaks use it too
    result: dict = {
        "machine": machine_info(args.dtype, torch.get_num_threads()),
        "config": _config_json(plan),
        "experiments": {},
    }
    args.result_json.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    continuous = experiments.ContinuousRuns(plan)
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        if name == "roofline":
            out = experiments.roofline(plan)
        else:
            out = getattr(experiments, name)(plan, continuous)
        out["wall_s"] = time.perf_counter() - t0
        result["experiments"][name] = out
        result["wall_s"] = time.perf_counter() - started
        result["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
        args.result_json.write_text(result_json_text(result))  # a later failure keeps these
    continuous.close()
    from bench.plots import plot_offline

    plot_offline(result, args.plot)
    print(format_summary(result))
    print(f"result: {args.result_json}  plot: {args.plot}  ({result['wall_s']:.0f} s)")
    return 0


def _config_json(plan: experiments.BenchPlan) -> dict:
    s, w = plan.settings, plan.workloads[0]
    return {
        "model": s.model,
        "dtype": s.dtype,
        "block_size": s.block_size,
        "kv_cache_gb": s.kv_cache_gb,
        "prefix_caching": False,
        "batch_size": plan.batch_size,
        "num_requests": w.num_requests,
        "prompt_len": len(w.prompts[0]),
        "caps": plan.caps,
        "output_lens": {wl.name: list(wl.output_lens) for wl in plan.workloads},
        "roofline_batches": plan.roofline_batches,
        "seed": plan.seed,
        "quick": plan.quick,
    }
