"""`splitserve bench sim-fit`: time the real engine's steps here and fit the simulator's CPU
cost model (sim.cost.FittedCost) to them.

    prefill  one prompt of each length, alone in a step
    decode   B sequences decoding at context C (the median of a few steps)
    mixed    a prompt joining B decoding sequences (a colocated worker's step)
Every timed step's four features come from the scheduler's own output for that step
(engine.scheduler.SchedulerOutput.features), so the fit sees what the simulator will ask it.

    contention  the same decode and prefill points while a second process steps its own
                engine (the other worker on this host): slower by a factor, the cost
                model's `host_share`, which the simulator applies while two workers of one
                host step at once. From the serving workers' logs (`--from-steps`, and
                bench sim-validate's calibration) a second share is fitted apart,
                `host_share_prefill`: the slowdown while the other worker's step holds
                prompt tokens (fit_with_contention)

Writes the cost model as JSON, with every row and the fit's error per row.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import time
from pathlib import Path
from typing import Any

from bench.sim_steps import fit_logged
from engine.engine_config import EngineConfig
from engine.sampling_params import SamplingParams
from sim.cost import FittedCost, Hops, fit_knee

RESULTS = Path("bench/results")
PREFILL = (32, 128, 256, 512, 1024, 2048)
DECODE = ((1, 64), (4, 64), (16, 64), (32, 64), (64, 64), (4, 1024), (16, 256), (32, 256))
MIXED = ((4, 64), (4, 512), (16, 256), (16, 1024))  # (decoding sequences, prompt tokens)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=1, help="torch threads, as one worker has")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per point")
    p.add_argument("--no-contention", action="store_true", help="skip the two-process points")
    p.add_argument("--out", type=Path, default=RESULTS / "sim_cost.json")
    p.add_argument("--refit", action="store_true", help="fit --out's saved rows again, no timing")
    p.add_argument(
        "--from-steps",
        type=Path,
        default=None,
        help="fit to the serving workers' step logs in this directory (SPLITSERVE_STEP_LOG)",
    )
    p.add_argument("--scatter", action="store_true",
                   help="with --from-steps: also how the steps scatter about the model and "
                   "how long a slow stretch lasts (sim.noise), which `splitserve sim` "
                   "then draws")  # fmt: skip


def _engine(args: argparse.Namespace) -> Any:
    from engine.threads import engine_here

    return engine_here(EngineConfig(model=args.model, dtype=args.dtype, num_threads=args.threads))


class _Probe:
    """Each engine step's time and the features of what the scheduler put in it."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.rows: list[tuple[tuple, float]] = []
        schedule = engine.scheduler.schedule
        self._last: tuple = ()

        def probed():
            out = schedule()
            self._last = out.features()
            return out

        engine.scheduler.schedule = probed

    def step(self, keep: bool = True) -> None:
        t0 = time.perf_counter()
        self.engine.step()
        dt = time.perf_counter() - t0
        if keep and self._last:
            self.rows.append((self._last, dt))


def _ids(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(1, 49000) for _ in range(n)]


def _decoding(probe: _Probe, batch: int, ctx: int, rng: random.Random, tag: str) -> list[str]:
    """`batch` sequences past their prefill, decoding (their prefill steps are not kept)."""
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for rid in ids:
        probe.engine.add_request(rid, _ids(ctx, rng), params)
    while any(len(s.token_ids) == s.num_prompt_tokens for s in probe.engine.scheduler.running) \
            or probe.engine.scheduler.waiting:  # fmt: skip
        probe.step(keep=False)
    probe.step(keep=False)  # warm-up
    return ids


def measure(probe: _Probe, repeats: int, seed: int = 0) -> None:
    eng, rng = probe.engine, random.Random(seed)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for n in PREFILL:
        for r in range(repeats):
            eng.add_request(f"p{n}-{r}", _ids(n, rng), one)
            while eng.has_unfinished():
                probe.step()
    for batch, ctx in DECODE:
        ids = _decoding(probe, batch, ctx, rng, f"d{batch}-{ctx}")
        for _ in range(repeats):
            probe.step()
        for rid in ids:
            eng.abort(rid)
    for batch, n in MIXED:
        ids = _decoding(probe, batch, 128, rng, f"m{batch}-{n}")
        for r in range(repeats):
            eng.add_request(f"mp{n}-{r}", _ids(n, rng), one)
            probe.step()
        for rid in ids:
            eng.abort(rid)
        while eng.has_unfinished():
            probe.step(keep=False)


def _background(args: argparse.Namespace, ready: Any, stop: Any) -> None:
    """The other worker on this host: an engine decoding 16 sequences, step after step."""
    probe = _Probe(_engine(args))
    _decoding(probe, 16, 256, random.Random(1), "bg")
    ready.set()
    while not stop.is_set():
        probe.step(keep=False)


def _contention(args: argparse.Namespace, probe: _Probe) -> float:
    """Median slowdown of this engine's steps while another process steps its own."""
    alone = _subset(probe, args.repeats, 1000)
    ctx = mp.get_context("spawn")  # a fresh interpreter: no torch state shared with this one
    ready, stop = ctx.Event(), ctx.Event()
    bg = ctx.Process(target=_background, args=(args, ready, stop), daemon=True)
    bg.start()
    try:
        if not ready.wait(300):
            raise RuntimeError("the background engine did not start in 300 s")
        shared = _subset(probe, args.repeats, 2000)
    finally:
        stop.set()
        bg.join(30)
    ratios = [s / a for a, s in zip(alone, shared, strict=True)]
    print(f"contention: alone {alone}, shared {shared}")
    return statistics.median(ratios)


def _subset(probe: _Probe, repeats: int, seed: int) -> list[float]:
    """A few decode and prefill points, each the median of its steps (fresh prompts: a
    prompt seen before would be served from the prefix cache)."""
    out = []
    for batch, ctx in ((4, 64), (32, 64)):
        start = len(probe.rows)
        ids = _decoding(probe, batch, ctx, random.Random(seed), f"c{seed}-{batch}")
        for _ in range(repeats + 2):
            probe.step()
        out.append(statistics.median(dt for _, dt in probe.rows[start:]))
        del probe.rows[start:]
        for rid in ids:
            probe.engine.abort(rid)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    start = len(probe.rows)
    for r in range(repeats):
        probe.engine.add_request(f"cp{seed}-{r}", _ids(512, random.Random(seed + r)), one)
        while probe.engine.has_unfinished():
            probe.step()
    out.append(statistics.median(dt for _, dt in probe.rows[start:]))
    del probe.rows[start:]
    return out


def run(args: argparse.Namespace) -> int:
    if args.from_steps is not None:
        cost, rows = fit_logged(args.from_steps, FittedCost.load(args.out),
                                f"bench sim-fit --from-steps {args.from_steps}",
                                args.scatter)  # fmt: skip
        return _write(args, cost, [(r.features, r.seconds) for r in rows])
    if args.refit:
        saved = json.loads(args.out.read_text())
        steps = [(tuple(r["features"]), r["step_s"]) for r in saved["rows"]]
        cost = FittedCost.load(args.out)
        cost.coef, cost.decode_knee = fit_knee(steps)
        return _write(args, cost, steps)
    probe = _Probe(_engine(args))
    eng = probe.engine
    _decoding(probe, 1, 16, random.Random(9), "warm")
    for rid in list(eng._requests):
        eng.abort(rid)
    measure(probe, args.repeats)
    coef, knee = fit_knee(probe.rows)
    # measured below 1 (noise: the other process did not slow this one) counts as 1
    share = 1.0 if args.no_contention else max(1.0, _contention(args, probe))
    cost = FittedCost(coef, eng.scheduler.config.num_blocks, eng.config.block_size,
                      eng.model_config.num_layers, Hops(), host_share=share, decode_knee=knee,
                      source=f"bench sim-fit: {args.model} {eng.config.dtype}, "
                      f"{args.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M')}")  # fmt: skip
    return _write(args, cost, probe.rows)


def _write(args: argparse.Namespace, cost: FittedCost, steps: list[tuple[tuple, float]]) -> int:
    errs = [cost.step_s(*f) / dt - 1 for f, dt in steps]
    out = cost.to_json() | {
        "rows": [{"features": list(f), "step_s": dt} for f, dt in steps],
        "fit_error_median": statistics.median(abs(e) for e in errs),
        "fit_error_max": max(abs(e) for e in errs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("coef", "host_share", "fit_error_median",
                                          "fit_error_max")}, indent=1))  # fmt: skip
    print(f"{len(steps)} steps; wrote {args.out}")
    return 0
