"""The calibration behind `bench sim-validate`: per serving mode, a load (bench.sim_loads)
on a real server whose workers log every engine step; the cost model fitted to those steps
(bench.sim_fit), and the cost per request outside the steps read off the gap between the
real TTFTs and the simulated ones with no such cost, over the phases scaled like the
workloads (not the last one, which fills the decode batch for the step fit):

    router_s       the median gap of the requests that arrived with nothing in flight (as
                   the simulator saw it: Record.busy, what it then uses)
    router_busy_s  the median gap of the rest. Disaggregated, with others in flight the one
                   decode worker is stepping, and a new prompt's calls to it (the
                   reservation, the KV's done) wait on its busy process beyond the step
                   boundary the simulator already models: short prompts were ~1 ms off when
                   it was idle and ~21 ms when it stepped (2026-12-07's calibration).
                   Colocated showed no such effect (the router sends a prompt to the less
                   busy worker); there the split only follows which prompts arrive idle.

Each is the median of all the gaps when fewer than MIN_SPLIT requests are on its side.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import statistics
from pathlib import Path

from bench.sim_loads import calibration_load, requests_of
from bench.sim_steps import fit_logged, logged_steps, persistence, ratios
from engine.step_log import ENV as STEP_ENV
from sim.cluster import ClusterConfig
from sim.cost import FittedCost
from sim.report import median_of
from sim.simulate import SimResult, simulate
from sim.workload import SimRequest

MODES = {
    "disaggregated": ["--prefill", "1", "--decode", "1"],
    "colocated": ["--mode", "colocated", "--prefill", "1", "--decode", "1"],
}
MIN_SPLIT = 10  # requests on each side before the idle and busy costs are told apart
# simulations per figure where the model scatters its steps (cost.noise): a figure is their
# median, as a real figure is the median of its repeats
NOISE_DRAWS = 5


def steps_dir(out: Path, mode: str) -> Path:
    """Where a run's calibration steps are logged: beside its result file, so a second run
    (another --out) does not overwrite what --rescore of the first one reads."""
    return out.with_name(f"{out.stem}_steps_{mode}")


def run_steps_dir(out: Path, mode: str, workload: str, repeat: int) -> Path:
    """Where a validation run's steps are logged (for `step_drift`)."""
    return out.with_name(f"{out.stem}_steps_{mode}_{workload}_{repeat}")


def step_drift(cost: FittedCost, directory: Path) -> float | None:
    """How much slower the engine stepped during a real run than the calibrated model says
    for the same steps: the median over its logged steps of real / predicted time, the
    host's contention included (1.1: 10% slower). This shared machine's speed drifts, and
    a drift since the calibration is an error no model of the system removes. None: no
    steps logged (a run from before they were)."""
    rows = logged_steps(directory)
    return statistics.median(ratios(cost, rows)) if rows else None


def median_drift(drift: list[float | None]) -> float | None:
    """The median of the real runs' step drifts (None: no run logged its steps)."""
    seen = [d for d in drift if d is not None]
    return statistics.median(seen) if seen else None


def drifted(cost: FittedCost, drift: list[float | None]) -> FittedCost | None:
    """The calibrated model with every step time scaled by the real runs' median drift:
    the machine's speed during those runs, the model's shape (batch, context, contention,
    fixed costs) from the calibration. What the simulator predicts with this is its error
    without the drift. None: no run logged its steps."""
    k = median_drift(drift)
    if k is None:
        return None
    source = f"{cost.source}; step times x{k:.3f}, the runs' drift"
    return dataclasses.replace(cost, coef={t: v * k for t, v in cost.coef.items()}, source=source)


def run_real(mode: str, reqs: list[SimRequest], seed: int, steps: Path | None = None) -> list[dict]:
    """`reqs` on a real server in `mode` (after two warm-up requests); the client's records.
    `steps`: the workers log every engine step there."""
    from bench.autoscale_bench import drive
    from bench.server_process import ServerProcess

    env = {**os.environ, **({STEP_ENV: str(steps)} if steps else {})}
    with ServerProcess(*MODES[mode], env=env) as srv:
        asyncio.run(drive(srv.base, [SimRequest(0.0, 16, 4), SimRequest(0.1, 16, 4)], seed))
        if steps is not None:  # the warm-up's steps are not the workload's
            for f in steps.glob("steps-*.jsonl"):
                f.write_text("")
        return asyncio.run(drive(srv.base, reqs, seed))


def simulate_mode(cost: FittedCost, mode: str, reqs: list[SimRequest], seed: int,
                  args: argparse.Namespace, noise_seed: int = 0) -> SimResult:  # fmt: skip
    cfg = ClusterConfig(mode=mode, prefill=1, decode=1, shared_host=True, seed=seed,
                        noise_seed=noise_seed)  # fmt: skip
    return simulate(cost, cfg, reqs, args.ttft_ms / 1000, args.tpot_ms / 1000)


def draws(cost: FittedCost) -> int:
    """Simulations a figure takes: NOISE_DRAWS where the steps scatter, else one."""
    return NOISE_DRAWS if cost.noise is not None else 1


def simulate_draws(cost: FittedCost, mode: str, reqs: list[SimRequest], seed: int,
                   args: argparse.Namespace) -> tuple[dict, dict]:  # fmt: skip
    """Each figure's median over NOISE_DRAWS simulations (one where the steps do not
    scatter), each with its own draw of the workers' slowness, and its spread."""
    return median_of([simulate_mode(cost, mode, reqs, seed, args, n).summary
                      for n in range(draws(cost))])  # fmt: skip


def calibrate(base: FittedCost, mode: str, args: argparse.Namespace) -> tuple[FittedCost, dict]:
    """Fit the cost model to the workers' own steps under the calibration load, then the
    fixed cost per request outside the steps."""
    steps = steps_dir(args.out, mode)
    shutil.rmtree(steps, ignore_errors=True)
    load = calibration_load(base)
    real = run_real(mode, requests_of(load, args.seed + 100, args.scale), args.seed + 100, steps)
    return calibrated(base, mode, real, steps, args, load)


def calibrated(base: FittedCost, mode: str, real: list[dict], steps: Path,
               args: argparse.Namespace, load: list[dict]) -> tuple[FittedCost, dict]:  # fmt: skip
    """The cost model fitted to the logged steps, with router_s and router_busy_s read off
    the calibration requests' TTFT: real minus simulated with no cost outside the steps.
    `load`: the calibration phases the real run was offered (saved with it)."""
    reqs = requests_of(load, args.seed + 100, args.scale)
    hops = dataclasses.replace(
        base.hops, router_s=0.0, router_busy_s=None, rpc_s=0.0, deliver_s=0.0
    )
    fitted, rows = fit_logged(steps, dataclasses.replace(base, hops=hops),
                              f"serving workers' steps, {mode}, calibration load",
                              args.scatter)  # fmt: skip
    # the fixed costs from the phases scaled like the workloads; the decode phase (last,
    # near the decode worker's capacity) is there for the steps. Where the steps scatter,
    # the gaps of every draw of it are pooled (one draw's ~40 idle arrivals move the
    # median by 20 ms)
    light = len(requests_of([p for p in load if not p.get("unscaled")], args.seed + 100,
                            args.scale))  # fmt: skip
    gaps = []
    for n in range(draws(fitted)):
        sim = simulate_mode(fitted, mode, reqs, args.seed + 100, args, n)
        gaps += [(r["ttft_s"] - s.ttft_s, s.busy)
                 for r, s in zip(real[:light], sim.records[:light], strict=True)
                 if r["ttft_s"] is not None and s.ttft_s is not None]  # fmt: skip
    idle, busy = fixed_costs(gaps)
    hops = dataclasses.replace(hops, router_s=idle, router_busy_s=busy)
    tuned = dataclasses.replace(fitted, hops=hops)
    errs = [tuned.step_s(*r.features) / r.seconds - 1 for r in rows]
    return tuned, {"router_s": idle, "router_busy_s": busy, "coef": tuned.coef,
                   "decode_knee": tuned.decode_knee, "load": load,
                   "host_share": tuned.host_share,
                   "host_share_prefill": tuned.host_share_prefill, "steps": len(rows),
                   "step_fit_error_median": statistics.median(abs(e) for e in errs),
                   "persistence": persistence(tuned, rows),
                   "noise": None if tuned.noise is None else tuned.noise.to_json(),
                   "real_rows": real}  # fmt: skip


def fixed_costs(gaps: list[tuple[float, bool]]) -> tuple[float, float]:
    """(router_s, router_busy_s) from (gap, arrived while others were in flight) pairs."""
    overall = max(0.0, statistics.median(g for g, _ in gaps))
    sides = ([g for g, busy in gaps if busy is side] for side in (False, True))
    idle, busy = (max(0.0, statistics.median(s)) if len(s) >= MIN_SPLIT else overall
                  for s in sides)  # fmt: skip
    return idle, busy
