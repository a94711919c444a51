"""The simulator's host model (sim.cost.FittedCost.host_factor) against what the workers'
logged steps show when several share this machine, and where the host's CPU goes.

    python -m bench.sim_host steps CAL_DIR RUN_DIR [--split 60,210]
        every step a run's workers logged (SPLITSERVE_STEP_LOG=RUN_DIR), grouped by kind
        and by how many other workers stepped beside it (rounded mean over the step), and
        optionally by phase (seconds from the first step): its real time over the model
        fitted to CAL_DIR's steps (no contention), against the host factor the simulator
        would give that step
    python -m bench.sim_host pairs CAL_DIR [RUN_DIR]
        the decode steps logged under RUN_DIR (default CAL_DIR) that ran beside another
        worker's decode steps throughout, grouped by their own batch and the largest batch
        beside them (powers of two): real time over the model fitted to CAL_DIR, alone
    python -m bench.sim_host cpu --rate 5 --seconds 60 [--colocated]
        a real server (one prefill, one decode worker; or two colocated) under a Poisson
        load of 64-token prompts and 128 output tokens: CPU seconds per process group over
        the load (with SPLITSERVE_STEP_LOG=DIR set, its workers log their steps there)
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

from bench.sim_steps import fit_logged, logged_steps, read_logs, steps_of
from sim.cost import FittedCost

MIN_GROUP = 10  # steps in a group before `pairs` prints it


def by_neighbours(cost: FittedCost, run: Path, split: list[float]) -> dict[tuple, list]:
    """(kind, other workers stepping beside it, phase) -> [(real / modelled alone, the
    simulator's host factor), ...] over every step logged under `run` (as
    bench.sim_steps.logged_steps times them)."""
    rows = logged_steps(run)
    t0 = min((r.start for r in rows), default=0.0)
    out: dict[tuple, list] = defaultdict(list)
    for r in rows:
        k = round(r.beside)
        phase = bisect.bisect_right(split, r.start - t0)
        out[("prefill" if r.features[0] else "decode", k, phase)].append(
            (r.seconds / cost.step_s(*r.features),
             cost.host_factor(1 + k, min(k, round(r.beside_prefill))))
        )  # fmt: skip
    return out


def _steps(args: argparse.Namespace) -> None:
    cost, _ = fit_logged(args.calibration, FittedCost({}, 1), f"steps under {args.calibration}")
    print(f"calibration: host_share {cost.host_share:.3f}, beside a prefill "
          f"{cost.share_beside_prefill:.3f}, host_slots {cost.host_slots}")  # fmt: skip
    print("| step | others stepping | phase | steps | real / modelled alone (p50) | simulator |")
    print("|---|---|---|---|---|---|")
    for (kind, k, phase), v in sorted(by_neighbours(cost, args.run, args.split).items()):
        real = statistics.median(r for r, _ in v)
        sim = statistics.median(s for _, s in v)
        print(f"| {kind} | {k} | {phase} | {len(v)} | {real:.3f} | {sim:.3f} |")


def _bucket(n: int) -> int:
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def pairs(cost: FittedCost, directory: Path) -> dict[tuple[int, int], list[float]]:
    """(own batch, largest batch beside it; powers of two) -> real / modelled alone, over
    the decode steps that ran beside other workers' decode steps nine tenths or more."""
    procs = read_logs(directory)
    starts = [[s[4] for s in p] for p in procs]
    out: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in steps_of(procs):
        if r.features[0] or not r.features[2] or r.overlap - r.prefill_overlap < 0.9:
            continue
        end, beside = r.start + r.seconds, []
        for j, (p, st) in enumerate(zip(procs, starts, strict=True)):
            if j != r.worker:
                hi = bisect.bisect_right(st, end)
                lo = bisect.bisect_left(st, r.start - 5.0)
                beside += [o[2] for o in p[lo:hi] if o[4] + o[5] > r.start and not o[0]]
        if beside:
            key = (_bucket(r.features[2]), _bucket(max(beside)))
            out[key].append(r.seconds / cost.step_s(*r.features))
    return out


def _pairs(args: argparse.Namespace) -> None:
    cost, _ = fit_logged(args.calibration, FittedCost({}, 1), f"steps under {args.calibration}")
    print(f"host_share {cost.host_share:.3f}")
    print("| own batch up to | beside a batch up to | steps | real / modelled alone (p50) |")
    print("|---|---|---|---|")
    for (own, other), v in sorted(pairs(cost, args.run or args.calibration).items()):
        if len(v) >= MIN_GROUP:
            print(f"| {own} | {other} | {len(v)} | {statistics.median(v):.3f} |")


def group(cmd: str, pid: int) -> str:
    """Which part of a served load a process is, by its command line."""
    if pid == os.getpid():
        return "client (this load)"
    if "splitserve serve" in cmd:
        return "router"
    for actor in ("PrefillWorker", "DecodeWorker", "ColocatedWorker"):
        if f"ray::{actor}" in cmd:
            return actor
    if "ray::" in cmd:
        return "other Ray actors"
    if any(k in cmd for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "/ray/")):
        return "Ray's own processes"
    return "other"


def _cpu_seconds() -> dict[int, tuple[float, str]]:
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        out[int(pid)] = ((int(stat[11]) + int(stat[12])) / tick, cmd)
    return out


def _cpu(args: argparse.Namespace) -> None:
    from bench.autoscale_bench import drive
    from bench.server_process import ServerProcess
    from sim.workload import SimRequest, poisson_times

    reqs = [SimRequest(t, 64, 128) for t in poisson_times([(args.seconds, args.rate)], 1)]
    mode = ["--mode", "colocated"] if args.colocated else []
    with ServerProcess(*mode, "--prefill", "1", "--decode", "1") as srv:
        asyncio.run(drive(srv.base, [SimRequest(0.0, 16, 4)], 0))  # warm-up
        before, t0 = _cpu_seconds(), time.monotonic()
        records = asyncio.run(drive(srv.base, reqs, 1))
        after, wall = _cpu_seconds(), time.monotonic() - t0
    groups: dict[str, float] = defaultdict(float)
    for pid, (cpu, cmd) in after.items():
        groups[group(cmd, pid)] += cpu - before.get(pid, (0.0, cmd))[0]
    ok = sum(not r.get("error") for r in records)
    print(f"{args.rate} req/s for {args.seconds:.0f} s: {ok} of {len(records)} served, "
          f"{wall:.0f} s")  # fmt: skip
    for name, cpu in sorted(groups.items(), key=lambda g: -g[1]):
        print(f"  {name:22s} {cpu:6.1f} CPU-s  {cpu / wall:.2f} cores")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sim_host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("steps", help="logged steps against the simulator's host factor")
    s.add_argument("calibration", type=Path)
    s.add_argument("run", type=Path)
    s.add_argument("--split", type=lambda v: [float(x) for x in v.split(",")], default=[],
                   help="phase boundaries, seconds from the run's first step")  # fmt: skip
    pa = sub.add_parser("pairs", help="decode steps by their batch and the one beside them")
    pa.add_argument("calibration", type=Path)
    pa.add_argument("run", type=Path, nargs="?", default=None)
    c = sub.add_parser("cpu", help="CPU per process group under a real load")
    c.add_argument("--rate", type=float, default=5.0)
    c.add_argument("--seconds", type=float, default=60.0)
    c.add_argument("--colocated", action="store_true", help="two colocated workers")
    args = p.parse_args(argv)
    {"steps": _steps, "pairs": _pairs, "cpu": _cpu}[args.what](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
