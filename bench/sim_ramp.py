"""A real autoscaler ramp (`splitserve bench autoscale` result JSON) against the simulator
running the same phases, arrivals, lengths and autoscaler settings: workers per pool over
time, when each pool changed, latency and attainment, side by side.

A new worker's start-up time (Ray actor placed, model loaded, profiled, active) is read off
the real run's polls: from the first poll showing it starting to the one showing it active.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from bench.sim_calibrate import draws
from planner import AutoscaleConfig, PoolLimits
from sim.cluster import ClusterConfig
from sim.cost import FittedCost
from sim.report import errors, median_of, summarize
from sim.simulate import SimResult, simulate
from sim.workload import SimRequest, parse_phases, poisson_times

POOLS = ("prefill", "decode")


def start_times(polls: list[dict]) -> list[float]:
    """Seconds from a worker first seen starting to the pool's active count growing."""
    out = []
    for pool in POOLS:
        since = None
        for prev, cur in zip(polls, polls[1:], strict=False):
            if since is None and cur[f"{pool}_starting"] > prev[f"{pool}_starting"]:
                since = cur["t"]
            if since is not None and cur[f"{pool}_active"] > prev[f"{pool}_active"]:
                out.append(cur["t"] - since)
                since = None
    return out


def changes(timeline: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """(time, +1 / -1) each time the active count moves."""
    return [(t, n - m) for (_, m), (t, n) in zip(timeline, timeline[1:], strict=False) if n != m]


def worker_seconds(timeline: list[tuple[float, int]], end: float) -> float:
    pts = [p for p in timeline if p[0] <= end] + [(end, 0)]
    return sum((b[0] - a[0]) * a[1] for a, b in zip(pts, pts[1:], strict=False))


def compare_ramp(base: FittedCost, path: Path) -> dict[str, Any]:
    """`base`: the cost model calibrated for the disaggregated mode (its router_s kept)."""
    real = json.loads(Path(path).read_text())
    cfg = real["config"]
    phases = parse_phases(cfg["phases"])
    starts = start_times(real["polls"])
    start_s = statistics.median(starts) if starts else base.hops.worker_start_s
    cost = dataclasses.replace(
        base,
        hops=dataclasses.replace(base.hops, worker_start_s=start_s),
    )
    interval = cfg["interval"]
    limits = PoolLimits(1, cfg["max_workers"])
    auto = AutoscaleConfig(ttft_target_s=cfg["ttft_target_ms"] / 1000,
                           tpot_target_s=cfg["tpot_target_ms"] / 1000, prefill=limits,
                           decode=limits, interval_s=interval, window_s=3 * interval,
                           cooldown_s=cfg["cooldown"])  # fmt: skip
    reqs = [SimRequest(t, cfg["input_len"], cfg["output_len"])
            for t in poisson_times(phases, cfg["seed"])]  # fmt: skip
    horizon = sum(s for s, _ in phases)
    slo = (auto.ttft_target_s, auto.tpot_target_s)
    runs = [simulate(cost, ClusterConfig(shared_host=True, seed=cfg["seed"], noise_seed=n),
                     reqs, *slo, autoscale=auto, duration_s=horizon)
            for n in range(draws(cost))]  # fmt: skip
    timelines = median_timelines(runs)
    out: dict[str, Any] = {"result": str(path), "worker_start_s": start_s, "pools": {},
                           "draws": len(runs)}  # fmt: skip
    for pool in POOLS:
        real_tl = [(p["t"], p[f"{pool}_active"]) for p in real["polls"]]
        sim_tl = timelines[pool]
        out["pools"][pool] = {
            "real_changes": changes(real_tl), "sim_changes": changes(sim_tl),
            "real_worker_s": worker_seconds(real_tl, horizon),
            "sim_worker_s": worker_seconds(sim_tl, horizon),
            "real_max": max(n for _, n in real_tl), "sim_max": max(n for _, n in sim_tl),
        }  # fmt: skip
    real_sum = summarize(real["records"], *slo)
    out["real"] = real_sum
    out["sim"], out["sim_spread"] = median_of([r.summary for r in runs])
    out["error"] = errors(real_sum, out["sim"])
    out["sim_timeline"] = [{"t": t, **{f"{p}_active": timelines[p][i][1] for p in POOLS}}
                           for i, (t, _) in enumerate(timelines[POOLS[0]])]  # fmt: skip
    return out


def median_timelines(runs: list[SimResult]) -> dict[str, list[tuple[float, int]]]:
    """Each pool's active workers at each sample time, the median over the simulations
    (each with its own draw of the steps' scatter; they sample at the same times)."""
    n = min(len(r.samples) for r in runs)
    return {pool: [(runs[0].samples[i].t,
                    int(statistics.median_low(r.samples[i].active[pool] for r in runs)))
                   for i in range(n)] for pool in POOLS}  # fmt: skip


def format_ramp(r: dict) -> str:
    lines = [f"ramp {r['result']} (worker start-up {r['worker_start_s']:.1f} s, from the run)"]
    for pool, p in r["pools"].items():
        real = ", ".join(f"{'+' if d > 0 else '-'}1 at {t:.0f} s" for t, d in p["real_changes"])
        sim = ", ".join(f"{'+' if d > 0 else '-'}1 at {t:.0f} s" for t, d in p["sim_changes"])
        lines.append(
            f"  {pool}: real [{real or 'no change'}] | sim [{sim or 'no change'}]; "
            f"worker-seconds {p['real_worker_s']:.0f} / {p['sim_worker_s']:.0f}"
        )
    return "\n".join(lines)
