"""`splitserve bench sim-validate`: the same workloads on the real system and in the simulator,
side by side, with the error of each figure.

    calibrate   per mode, a calibration load (lengths drawn from ranges, not the validation
                workloads', then a phase that fills the decode batch: bench.sim_loads):
                the serving workers log every engine step (SPLITSERVE_STEP_LOG)
                and the cost model is fitted to those steps (bench.sim_fit), so it carries
                the workers' threads, their neighbours on the 2 cores and their per-layer KV
                hooks; the cost per request outside the steps (HTTP, Ray calls,
                loopback) is read off the real TTFTs minus the simulated ones with no such
                cost, apart for requests that arrive with others in flight and without
                (bench.sim_calibrate)
    cost model  --cost (bench sim-fit's file): its KV and block sizes, and how fast this
                machine prefills: the loads' rates are scaled to it (bench.sim_loads)
    validate    each workload x mode: a real `splitserve serve` (1 prefill + 1 decode, or 2
                colocated workers), Poisson arrivals, streamed; then the simulator on the
                same arrival times and lengths (sim.workload draws them as this does);
                `--repeats N`: the real run N times (a fresh server each, the same
                arrivals), each figure the median of the N, and their spread reported
                (what this shared machine's noise does to one real run). The workers log
                their steps in each run too: the last column is how much slower they
                stepped than the calibrated model says (bench.sim_calibrate.step_drift),
                the machine's own drift since the calibration
    ramp        `--ramp RESULT.json` from `splitserve bench autoscale`: the simulator runs
                the same phases with the autoscaler on; workers per pool over time side by
                side (a new worker's start-up time is read off the real run's polls)

Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from bench.sim_calibrate import (
    MODES,
    NOISE_DRAWS,
    calibrate,
    calibrated,
    drifted,
    median_drift,
    run_real,
    run_steps_dir,
    simulate_draws,
    step_drift,
    steps_dir,
)
from bench.sim_loads import (
    CALIBRATION,
    DECODE_PHASE,
    MAX_PREFILL_LOAD,
    WORKLOADS,
    auto_scale,
    parse_scale,
    requests_of,
)
from engine.errors import SplitServeError
from sim.cost import FittedCost
from sim.report import errors, median_of, summarize

RESULTS = Path("bench/results")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cost", type=Path, default=RESULTS / "sim_cost.json",
                   help="bench sim-fit's model: its KV size and block size are kept")  # fmt: skip
    p.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    p.add_argument("--ttft-ms", type=float, default=1000.0, help="SLO for goodput")
    p.add_argument("--tpot-ms", type=float, default=75.0, help="SLO for goodput")
    p.add_argument("--ramp", type=Path, default=None, help="a `bench autoscale` result JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rate-scale", default="auto",
                   help="every load's rates times this, its durations divided by it; auto: "
                   "the largest factor <= 1 that keeps a prefill worker at most "
                   f"{100 * MAX_PREFILL_LOAD:.0f}%% busy by --cost (bench.sim_loads)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1,
                   help="real runs per workload and mode; a figure is their median")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS / "sim_validate.json")
    p.add_argument("--scatter", action="store_true",
                   help="fit how the calibration's steps scatter about the model and how "
                   "long a slow stretch lasts (sim.noise), and simulate with it: each figure "
                   f"the median of {NOISE_DRAWS} draws")  # fmt: skip
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="run only the calibration loads again, then --rescore",
    )
    p.add_argument(
        "--rescore",
        action="store_true",
        help="no real runs: simulate again against --out's saved real records and calibration",
    )


def rescore(args: argparse.Namespace, base: FittedCost) -> dict[str, Any]:
    """The saved real records and calibrations, simulated again (after a change to the
    simulator, or for another SLO)."""
    out = json.loads(args.out.read_text())
    slo = (args.ttft_ms / 1000, args.tpot_ms / 1000)
    out["slo_ms"] = [args.ttft_ms, args.tpot_ms]
    out["scatter"] = args.scatter
    costs = {}
    for mode, cal in list(out["calibration"].items()):
        load = cal.get("load", CALIBRATION)  # older files: the two scaled phases only
        costs[mode], out["calibration"][mode] = calibrated(
            base, mode, cal["real_rows"], steps_dir(args.out, mode), args, load
        )
        _print_calibration(mode, costs[mode], out["calibration"][mode])
    for e in out["runs"]:
        reqs = requests_of(WORKLOADS[e["workload"]], args.seed, args.scale)
        runs = e.get("real_rows_runs") or [e["real_rows"]]  # "real_rows": one run, older files
        e["real"], e["real_spread"] = median_summary(runs, slo)
        e["step_drift"] = [step_drift(costs[e["mode"]],
                                      run_steps_dir(args.out, e["mode"], e["workload"], i))
                           for i in range(len(runs))]  # fmt: skip
        score(e, costs[e["mode"]], reqs, args)
    if args.ramp is not None and "disaggregated" in costs:
        from bench.sim_ramp import compare_ramp

        out["ramp"] = compare_ramp(costs["disaggregated"], args.ramp)
    return out


def _print_calibration(mode: str, cost: FittedCost, cal: dict) -> None:
    """What the calibration found: the host's contention, the fixed costs, how the steps
    scatter about the model."""
    hops = cost.hops
    print(f"{mode}: host_share {cost.host_share:.3f} (beside a prefill "
          f"{cost.share_beside_prefill:.3f}), router_s "
          f"{hops.router_s:.4f}, busy {hops.routing_s(True):.4f}")  # fmt: skip
    noise = cost.noise
    if noise is not None:
        lasting = ", ".join(f"{sd:.3f} over {tau:g} s" for sd, tau in noise.components)
        print(f"{mode}: steps scatter (log sd) {noise.white:.3f} per step, {lasting}; "
              f"prefill steps {noise.prefill_white or 0:.3f} per step")  # fmt: skip
    scatter = cal["persistence"]
    if scatter is not None:
        print(f"{mode}: decode steps / model cv {scatter['cv']:.3f}, autocorrelation "
              f"{scatter['lag1']:.2f} (1 step) {scatter['lag10']:.2f} (10), 100-step "
              f"means cv {scatter['window_cv']:.3f} (independent steps: "
              f"{scatter['independent_window_cv']:.3f})")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise SplitServeError(f"--repeats must be >= 1, got {args.repeats}")
    scale = parse_scale(args.rate_scale)  # refused before anything runs
    base = FittedCost.load(args.cost)
    args.scale = _scale(args, base, scale)
    if args.recalibrate:  # new calibration runs; the saved validation runs are kept
        saved = json.loads(args.out.read_text())
        for mode in args.modes:
            _, saved["calibration"][mode] = calibrate(base, mode, args)
        _write(args.out, saved)
    if args.rescore or args.recalibrate:
        return _report(args, rescore(args, base))
    slo = (args.ttft_ms / 1000, args.tpot_ms / 1000)
    out: dict[str, Any] = {"cost": str(args.cost), "slo_ms": [args.ttft_ms, args.tpot_ms],
                           "rate_scale": args.scale, "calibration": {}, "runs": [],
                           "scatter": args.scatter}  # fmt: skip
    fitted: dict[str, FittedCost] = {}
    for mode in args.modes:
        cost, cal = calibrate(base, mode, args)
        fitted[mode] = cost
        out["calibration"][mode] = cal
        print(
            f"{mode}: calibration router_s {cal['router_s']:.4f}, busy "
            f"{cal['router_busy_s']:.4f}, {cal['steps']} steps, "
            f"fit error median {100 * cal['step_fit_error_median']:.1f}%",
            flush=True,
        )
        for name in args.workloads:
            w = WORKLOADS[name]
            reqs = requests_of(w, args.seed, args.scale)
            runs, drift = [], []
            for i in range(args.repeats):
                steps = run_steps_dir(args.out, mode, name, i)
                shutil.rmtree(steps, ignore_errors=True)
                runs.append(run_real(mode, reqs, args.seed, steps))
                drift.append(step_drift(cost, steps))
            real, spread = median_summary(runs, slo)
            entry = {"workload": name, "mode": mode, **w, "real": real, "real_spread": spread,
                     "real_rows_runs": runs, "step_drift": drift}  # fmt: skip
            score(entry, cost, reqs, args)
            out["runs"].append(entry)
            print(format_row(entry), flush=True)
            _write(args.out, out)
    if args.ramp is not None:
        from bench.sim_ramp import compare_ramp

        out["ramp"] = compare_ramp(fitted.get("disaggregated", base), args.ramp)
    return _report(args, out)


def score(e: dict, cost: FittedCost, reqs: list, args: argparse.Namespace) -> None:
    """The simulator's figures for a run's `real` ones, with the calibrated model ("sim",
    "error") and with it scaled by the real runs' own step drift ("sim_drifted",
    "error_drifted": the error the machine's drift since the calibration leaves out)."""
    mode = e["mode"]
    e["sim"], e["sim_spread"] = simulate_draws(cost, mode, reqs, args.seed, args)
    e["error"] = errors(e["real"], e["sim"])
    corrected = drifted(cost, e.get("step_drift") or [])
    if corrected is not None:
        e["sim_drifted"], _ = simulate_draws(corrected, mode, reqs, args.seed, args)
        e["error_drifted"] = errors(e["real"], e["sim_drifted"])


def _scale(args: argparse.Namespace, base: FittedCost, scale: float | None) -> float:
    """The rate scale: a saved run's own (--rescore, --recalibrate), else --rate-scale."""
    if args.rescore or args.recalibrate:
        return float(json.loads(args.out.read_text()).get("rate_scale", 1.0))
    scale = scale or auto_scale(base)
    calibration = sum(p["seconds"] for p in CALIBRATION) + DECODE_PHASE["seconds"] * scale
    workloads = sum(WORKLOADS[w]["seconds"] for w in args.workloads) * args.repeats
    span = (calibration + workloads) * len(args.modes)
    print(f"rate scale {scale:.3f}: about {span / scale / 60:.0f} min of arrivals", flush=True)
    return scale


def median_summary(runs: list[list[dict]], slo: tuple[float, float]) -> tuple[dict, dict]:
    """Each figure's median over the real runs, and its spread: (max - min) / median."""
    return median_of([summarize(rows, *slo) for rows in runs])


def _report(args: argparse.Namespace, out: dict[str, Any]) -> int:
    _write(args.out, out)
    print(format_table(out))
    if drifted_table := format_drifted(out):
        print("\nThe calibrated model's step times scaled by each figure's own drift:")
        print(drifted_table)
    if "ramp" in out:
        from bench.sim_ramp import format_ramp

        print(format_ramp(out["ramp"]))
    return 0


def _write(path: Path, out: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


KEYS = (("ttft_p50_ms", "TTFT p50"), ("ttft_p90_ms", "TTFT p90"), ("tpot_p50_ms", "TPOT p50"),
        ("tpot_p90_ms", "TPOT p90"), ("goodput_rps", "goodput"))  # fmt: skip


def _cell(real: Any, sim: Any, err: Any, key: str) -> str:
    if real is None or sim is None:
        return "-"
    fmt = "{:.2f}" if key == "goodput_rps" else "{:.0f}"
    e = "" if err is None else f" ({100 * err:+.0f}%)"
    return f"{fmt.format(real)} / {fmt.format(sim)}{e}"


def format_row(e: dict) -> str:
    cells = [_cell(e["real"].get(k), e["sim"].get(k), e["error"].get(k), k) for k, _ in KEYS]
    runs = len(e.get("real_rows_runs", [None]))
    spread = e.get("real_spread") or {}
    if runs > 1:  # the real runs' own spread, figure by figure
        cells = [f"{c}, spread {100 * spread[k]:.0f}%" if spread.get(k) is not None else c
                 for c, (k, _) in zip(cells, KEYS, strict=True)]  # fmt: skip
    drift = median_drift(e.get("step_drift") or [])
    cells.append("-" if drift is None else f"{100 * (drift - 1):+.0f}%")
    return f"| {e['workload']} | {e['mode']} | " + " | ".join(cells) + " |"


def format_drifted(out: dict) -> str:
    """The errors again with the calibrated model scaled by each figure's runs' step drift."""
    rows = [e for e in out["runs"] if "error_drifted" in e]
    if not rows:
        return ""
    lines = ["| workload | mode | drift | " + " | ".join(n for _, n in KEYS) + " |",
             "|" + "---|" * (len(KEYS) + 3)]  # fmt: skip
    for e in rows:
        drift = median_drift(e["step_drift"])
        cells = ["-" if e["error_drifted"].get(k) is None
                 else f"{100 * e['error_drifted'][k]:+.0f}%" for k, _ in KEYS]  # fmt: skip
        lines.append(f"| {e['workload']} | {e['mode']} | x{drift:.3f} | " + " | ".join(cells)
                     + " |")  # fmt: skip
    worst = [abs(v) for e in rows for v in e["error_drifted"].values() if v is not None]
    lines.append(f"\nwith the drift: largest error {100 * max(worst):.1f}%; median "
                 f"{100 * statistics.median(worst):.1f}%")  # fmt: skip
    return "\n".join(lines)


def format_table(out: dict) -> str:
    head = "| workload | mode | " + " | ".join(f"{n} real / sim" for _, n in KEYS)
    head += " | real steps vs calibration |"  # bench.sim_calibrate.step_drift
    lines = [head, "|" + "---|" * (len(KEYS) + 3)]
    lines += [format_row(e) for e in out["runs"]]
    worst = [abs(v) for e in out["runs"] for v in e["error"].values() if v is not None]
    if worst:
        lines.append(f"\nlargest error: {100 * max(worst):.1f}%; median "
                     f"{100 * statistics.median(worst):.1f}%")  # fmt: skip
    return "\n".join(lines)
