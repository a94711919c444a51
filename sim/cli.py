"""`splitserve sim` and `splitserve plan`: arguments in, a summary out; bad input is one line.

cost model   --cost FILE (bench sim-fit's fit of this machine) or --gpu G --model M
             [--tp N] (published figures, sim.hardware)
workload     --rate R --duration S | --phases S:R,... | --diurnal-peak R --duration S
             | --trace FILE; lengths --prompt-len / --output-len (N, LO-HI,
             lognormal:MEAN:CV)
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequestError
from engine.scheduler import SchedulerConfig
from sim import hardware
from sim.cost import CostModel, FittedCost, RooflineCost
from sim.workload import (
    SimRequest,
    diurnal_times,
    generate,
    load_trace,
    parse_length,
    parse_phases,
    poisson_times,
)


def add_cost_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cost model")
    g.add_argument("--cost", type=Path, help="a fitted cost model (splitserve bench sim-fit)")
    g.add_argument("--gpu", help="GPU type, e.g. h100, h200, a100, l40s")
    g.add_argument("--model", help="model, e.g. llama-3-8b, llama-3-70b")
    g.add_argument(
        "--tp",
        type=int,
        default=None,
        help="GPUs per worker (default: the fewest where the weights take at most half)",
    )
    g.add_argument("--max-num-seqs", type=int, default=None, help="decode batch bound")
    g.add_argument("--max-num-batched-tokens", type=int, default=None)


def add_workload_args(p: argparse.ArgumentParser, need_rate: bool = True) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--rate", type=float, help="requests per second (Poisson)")
    g.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    g.add_argument("--phases", help="SECONDS:REQ_PER_S,... (Poisson, stepping)")
    g.add_argument("--diurnal-peak", type=float, help="a day compressed into --duration")
    g.add_argument("--trough", type=float, default=0.3, help="diurnal: night rate / peak")
    g.add_argument("--trace", type=Path, help="JSON lines or CSV: arrival_s, prompt/output_tokens")
    g.add_argument("--prompt-len", default="lognormal:1024:1", help="N, LO-HI, lognormal:MEAN:CV")
    g.add_argument("--output-len", default="lognormal:256:1", help="N, LO-HI, lognormal:MEAN:CV")
    g.add_argument("--ttft-ms", type=float, default=2000.0, help="TTFT SLO")
    g.add_argument("--tpot-ms", type=float, default=100.0, help="TPOT SLO")
    g.add_argument("--seed", type=int, default=0)


def cost_model(args: argparse.Namespace) -> tuple[CostModel, int]:
    """(cost model, GPUs per worker) from the arguments."""
    if args.cost is not None:
        if args.gpu or args.model:
            raise InvalidRequestError("give --cost FILE or --gpu and --model, not both")
        return FittedCost.load(args.cost), 1
    if not (args.gpu and args.model):
        raise InvalidRequestError("say what to simulate: --gpu G --model M, or --cost FILE")
    gpu, model = hardware.lookup_gpu(args.gpu), hardware.lookup_model(args.model)
    if args.tp is not None:
        if args.tp < 1 or args.tp > 8 or args.tp & (args.tp - 1):
            raise InvalidRequestError(f"--tp must be 1, 2, 4 or 8, got {args.tp}")
        return RooflineCost(gpu, model, args.tp), args.tp
    for tp in (1, 2, 4, 8):  # the fewest GPUs where the weights leave at least half for KV
        if model.weight_bytes <= 0.5 * 0.9 * tp * gpu.hbm_gb * 1e9:
            return RooflineCost(gpu, model, tp), tp
    raise InvalidRequestError(f"{model.name} does not fit on 8 x {gpu.name}")


def scheduler_config(args: argparse.Namespace, cost: CostModel) -> SchedulerConfig:
    gpu = isinstance(cost, RooflineCost)  # a GPU batches wider than the CPU engine's default
    seqs = args.max_num_seqs or (256 if gpu else 64)
    tokens = args.max_num_batched_tokens or (8192 if gpu else 2048)
    if seqs < 1 or tokens < 1:
        raise InvalidRequestError("--max-num-seqs and --max-num-batched-tokens must be >= 1")
    return SchedulerConfig(num_blocks=cost.num_blocks, block_size=cost.block_size,
                           max_num_seqs=seqs, max_num_batched_tokens=tokens,
                           enable_prefix_caching=not gpu)  # fmt: skip


def slo(args: argparse.Namespace) -> tuple[float, float]:
    for name in ("ttft_ms", "tpot_ms"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v > 0):
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be above 0, got {v}")
    return args.ttft_ms / 1000, args.tpot_ms / 1000


def workload(args: argparse.Namespace) -> tuple[Iterable[SimRequest], float]:
    """(requests, in arrival order and drawn lazily; the span they arrive over)."""
    given = [x for x in ("rate", "phases", "diurnal_peak", "trace") if getattr(args, x)]
    if len(given) != 1:
        raise InvalidRequestError(
            "give one workload: --rate R, --phases S:R,..., --diurnal-peak R or --trace FILE"
        )
    if args.trace is not None:
        reqs = load_trace(args.trace)
        return reqs, reqs[-1].arrival_s
    if not args.duration > 0:
        raise InvalidRequestError(f"--duration must be above 0, got {args.duration}")
    prompt = parse_length(args.prompt_len, "--prompt-len")
    output = parse_length(args.output_len, "--output-len")
    if args.phases:
        phases = parse_phases(args.phases)
        times: Iterable[float] = poisson_times(phases, args.seed)
        span = sum(s for s, _ in phases)
    elif args.diurnal_peak:
        times = diurnal_times(args.diurnal_peak, args.duration, args.trough, args.seed)
        span = args.duration
    else:
        if not args.rate > 0:
            raise InvalidRequestError(f"--rate must be above 0, got {args.rate}")
        times, span = poisson_times([(args.duration, args.rate)], args.seed), args.duration
    return generate(times, prompt, output, args.seed), span


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
