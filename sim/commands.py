"""The `splitserve sim` and `splitserve plan` commands (arguments: sim.cli)."""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequestError
from planner import AutoscaleConfig, PoolLimits
from sim.cli import (
    add_cost_args,
    add_workload_args,
    cost_model,
    scheduler_config,
    slo,
    workload,
    write_json,
)
from sim.cluster import ClusterConfig
from sim.plan import PlanInput, bound_rate, capacities, plan_day, plan_rate, why
from sim.simulate import simulate
from sim.workload import SimRequest, diurnal_rate, load_trace, parse_length


def add_sim_args(p: argparse.ArgumentParser) -> None:
    add_cost_args(p)
    add_workload_args(p)
    g = p.add_argument_group("cluster")
    g.add_argument("--mode", default="disaggregated", choices=("disaggregated", "colocated"))
    g.add_argument("--prefill", type=int, default=1, help="prefill workers")
    g.add_argument("--decode", type=int, default=1, help="decode workers")
    g.add_argument("--max-tpot-ms", type=float, default=None, help="decode TPOT governor")
    g.add_argument("--autoscale", action="store_true", help="the SLO autoscaler, on the SLO")
    g.add_argument("--max-workers", type=int, default=8, help="autoscale: most per pool")
    g.add_argument("--interval", type=float, default=10.0, help="autoscale: seconds")
    g.add_argument("--cooldown", type=float, default=30.0, help="autoscale: seconds")
    g.add_argument(
        "--sample",
        type=int,
        default=1,
        help="simulate 1/N of the fleet: N identical cells (P/N + D/N workers), each taking a "
        "random 1/N of the requests; one cell is run, rates scaled back up",
    )
    g.add_argument("--json", type=Path, default=None)


def run_sim(args: argparse.Namespace) -> int:
    cost, tp = cost_model(args)
    ttft_s, tpot_s = slo(args)
    if args.prefill < 0 or args.decode < 0 or args.prefill + args.decode < 1:
        raise InvalidRequestError("--prefill and --decode must be >= 0, and a worker at least")
    if args.mode == "disaggregated" and (args.prefill < 1 or args.decode < 1):
        raise InvalidRequestError("disaggregated needs --prefill >= 1 and --decode >= 1")
    reqs, span = workload(args)
    n = args.sample
    if n < 1 or (n > 1 and (args.autoscale or args.prefill % n or args.decode % n)):
        raise InvalidRequestError(
            "--sample N needs N >= 1 dividing --prefill and --decode, and no --autoscale"
        )
    if n > 1:
        args.prefill, args.decode = args.prefill // n, args.decode // n
        reqs = thin(reqs, n, args.seed)
    auto = None
    if args.autoscale:
        limits = PoolLimits(1, args.max_workers)
        auto = AutoscaleConfig(ttft_target_s=ttft_s, tpot_target_s=tpot_s, prefill=limits,
                               decode=limits, interval_s=args.interval,
                               window_s=3 * args.interval, cooldown_s=args.cooldown)  # fmt: skip
    config = ClusterConfig(mode=args.mode, prefill=args.prefill, decode=args.decode,
                           scheduler=scheduler_config(args, cost), max_tpot_ms=args.max_tpot_ms,
                           gpus_per_worker=tp, shared_host=args.cost is not None,
                           seed=args.seed)  # fmt: skip
    res = simulate(cost, config, reqs, ttft_s, tpot_s, autoscale=auto, duration_s=span)
    if not res.records:
        raise InvalidRequestError("the workload has no requests (a rate or span too small)")
    s = res.summary
    if n > 1:
        for key in ("requests", "failed", "goodput_rps", "throughput_rps"):
            s[key] *= n
        print(f"sampled: one cell of {n} ({res.gpus} of {n * res.gpus} GPUs) simulated")
    print(f"{s['requests']} requests over {span:.0f} s on up to {n * res.gpus} GPU(s) "
          f"({tp} per worker); simulated in {res.wall_s:.1f} s")  # fmt: skip
    print(_line(s, ttft_s, tpot_s))
    if res.decisions:
        changed = [d for d in res.decisions if d.changed]
        print(f"autoscaler: {len(changed)} change(s): " + "; ".join(
            f"{d.now_s:.0f} s -> {d.prefill}P/{d.decode}D" for d in changed[:12]))  # fmt: skip
    write_json(args.json, {"summary": s, "wall_s": res.wall_s, "gpus": res.gpus,
                           "samples": [vars_of(x) for x in res.samples]})  # fmt: skip
    return 0


def thin(reqs: Iterable[SimRequest], n: int, seed: int) -> Iterator[SimRequest]:
    """A random 1/n of the requests (a thinned Poisson stream is Poisson at 1/n the rate)."""
    rng = random.Random(seed + 7)
    return (r for r in reqs if rng.random() * n < 1)


def vars_of(x: Any) -> dict:
    return {k: getattr(x, k) for k in x.__slots__}


def _line(s: dict, ttft_s: float, tpot_s: float) -> str:
    def ms(k: str) -> str:
        return "-" if s[k] is None else f"{s[k]:.0f}"

    return (f"TTFT p50/p90/p99 {ms('ttft_p50_ms')}/{ms('ttft_p90_ms')}/{ms('ttft_p99_ms')} ms; "
            f"TPOT p50/p90/p99 {ms('tpot_p50_ms')}/{ms('tpot_p90_ms')}/{ms('tpot_p99_ms')} ms; "
            f"{s['failed']} failed; within SLO ({1000 * ttft_s:.0f} / {1000 * tpot_s:.0f} ms): "
            f"{100 * s['attainment']:.1f}%, goodput {s['goodput_rps']:.2f} req/s")  # fmt: skip


def add_plan_args(p: argparse.ArgumentParser) -> None:
    add_cost_args(p)
    add_workload_args(p)
    p.add_argument("--percentile", type=float, default=90.0, help="the SLO holds at this pct")
    p.add_argument(
        "--pool", type=int, default=4, help="workers per pool the capacity is measured on"
    )
    p.add_argument("--requests", type=int, default=800, help="requests per simulated point")
    p.add_argument("--json", type=Path, default=None)


def run_plan(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cost, tp = cost_model(args)
    ttft_s, tpot_s = slo(args)
    if args.percentile not in (50.0, 90.0, 95.0, 99.0):
        raise InvalidRequestError(f"--percentile must be 50, 90, 95 or 99, got {args.percentile}")
    hourly = _hourly(args)
    inp = PlanInput(cost, parse_length(args.prompt_len, "--prompt-len"),
                    parse_length(args.output_len, "--output-len"), ttft_s, tpot_s,
                    args.percentile, tp, scheduler_config(args, cost), max(1, args.pool),
                    max(50, args.requests), args.seed)  # fmt: skip
    caps = capacities(inp, bound=bound_rate(inp))
    print(f"{getattr(cost, 'model', None) and cost.model.name or 'fitted model'} on "  # type: ignore[attr-defined]
          f"{tp} GPU(s) per worker; SLO p{args.percentile:g}: TTFT {args.ttft_ms:.0f} ms, "
          f"TPOT {args.tpot_ms:.0f} ms")  # fmt: skip
    print(f"per worker within the SLO: prefill {caps.prefill:.2f} req/s, decode "
          f"{caps.decode:.2f} req/s, colocated {caps.colocated:.2f} req/s")  # fmt: skip
    out: dict[str, Any] = {"capacities": vars_of(caps), "gpus_per_worker": tp,
                           "why": why(inp, caps)}  # fmt: skip
    for line in out["why"]:
        print("  " + line)
    if len(hourly) == 1:
        out["plan"] = r = plan_rate(inp, caps, hourly[0])
        print(_plan_line(r))
    else:
        out["day"] = day = plan_day(inp, caps, hourly)
        _print_day(day)
    out["wall_s"] = time.perf_counter() - t0
    print(f"planned in {out['wall_s']:.1f} s")
    write_json(args.json, out)
    return 0


def _hourly(args: argparse.Namespace) -> list[float]:
    """One rate (--rate) or 24 hourly rates (a diurnal day, or a trace counted per hour)."""
    if args.rate is not None and args.rate > 0 and not (args.diurnal_peak or args.trace):
        return [args.rate]
    if args.diurnal_peak and args.diurnal_peak > 0 and not (args.rate or args.trace):
        day = 24 * 3600.0
        return [diurnal_rate((h + 0.5) * 3600, args.diurnal_peak, day, args.trough)
                for h in range(24)]  # fmt: skip
    if args.trace is not None and not (args.rate or args.diurnal_peak):
        reqs = load_trace(args.trace)
        hours = int(reqs[-1].arrival_s // 3600) + 1
        counts = [0] * hours
        for r in reqs:
            counts[int(r.arrival_s // 3600)] += 1
        return [c / 3600 for c in counts]
    raise InvalidRequestError("give one of --rate R (> 0), --diurnal-peak R (> 0), --trace FILE")


def _plan_line(r: dict) -> str:
    line = (f"at {r['rate']:.2f} req/s: disaggregated {r['prefill']}P + {r['decode']}D = "
            f"{r['gpus_disaggregated']} GPUs ({r['goodput_per_gpu_disaggregated']:.3f} req/s "
            f"per GPU); colocated {r['colocated']} = {r['gpus_colocated']} GPUs "
            f"({r['goodput_per_gpu_colocated']:.3f} req/s per GPU)")  # fmt: skip
    v = r.get("verified")
    if v:
        more = " + ".join(f"{n} {pool}" for pool, n in v["added"].items() if n)
        line += (
            f"; simulated with both pools ({v['prefill']}P + {v['decode']}D at "
            f"{v['rate']:.1f} req/s): " + ("holds" if v["holds"] else "BREAKS the SLO")
        )
        if more:
            line += f" after adding {more} to that cell (the counts above include it)"
    vc = r.get("verified_colocated")
    if vc:
        line += (f"; colocated cell of {vc['colocated']} at {vc['rate']:.1f} req/s holds"
                 + (f" after adding {vc['added']}" if vc["added"] else ""))  # fmt: skip
    return line


def _print_day(day: dict) -> None:
    print("hour  req/s  prefill  decode  GPUs disagg  GPUs colocated")
    for h, r in enumerate(day["hours"]):
        print(f"{h:4d} {r['rate']:6.1f} {r['prefill']:8d} {r['decode']:7d} "
              f"{r['gpus_disaggregated']:12d} {r['gpus_colocated'] or 0:15d}")  # fmt: skip
    dis, col = day["gpu_hours_disaggregated"], day["gpu_hours_colocated"]
    print(f"GPU-hours over the day: disaggregated {dis}, colocated {col} "
          f"({'%.2fx' % (col / dis) if dis else '-'} as many colocated)")  # fmt: skip
    print("peak hour: " + _plan_line(day["peak"]))
