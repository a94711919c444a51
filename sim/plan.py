"""`splitserve plan`: the cheapest prefill and decode counts that hold an SLO, and what the
same traffic costs colocated.

    capacity per worker, by simulation (the real scheduler, routing and admission):
      prefill    the highest rate a pool of `pool` prefill workers takes with TTFT within
                 the target at the percentile (one output token: the decode pool idle)
      decode     the highest rate a pool of `pool` decode workers takes with TTFT and TPOT
                 within the targets, prefill workers in plenty
      colocated  the highest rate a pool of `pool` colocated workers takes within both
      each a bisection on the rate; a point holds when no request failed and both
      percentiles are within their targets
    a rate R needs ceil(R / prefill) prefill and ceil(R / decode) decode workers, against
    ceil(R / colocated) colocated ones; goodput per GPU = R / GPUs at that count
    a day (diurnal trace): the counts hour by hour, and the GPU-hours against colocated

Pools act as independent queues of `pool` workers each: a large pool balances load at least
as well, so the counts are on the safe side. As a check the plan is simulated with both
pools together: the whole fleet when it has at most `verify_workers` workers, else a cell of
it (each pool cut in proportion, the rate cut as much as the pool cut the most).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from engine.errors import InvalidRequestError
from engine.scheduler import SchedulerConfig
from sim.cluster import ClusterConfig
from sim.cost import CostModel
from sim.report import pct
from sim.simulate import simulate
from sim.workload import Length, SimRequest, generate, poisson_times


class NoConfiguration(InvalidRequestError):
    """No count of workers holds the SLO (a target below what one request alone takes)."""


@dataclass(frozen=True, slots=True)
class PlanInput:
    cost: CostModel
    prompt: Length
    output: Length
    ttft_s: float
    tpot_s: float
    percentile: float = 90.0
    gpus_per_worker: int = 1
    scheduler: SchedulerConfig | None = None
    pool: int = 4  # workers in the pool each capacity is measured on
    requests: int = 1200  # per simulated point
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Capacities:
    prefill: float  # requests per second one worker takes within the SLO
    decode: float
    colocated: float


def steady_s(inp: PlanInput) -> float:
    """Long enough for the pools to settle: ten times a mean request's life at no load."""
    import random

    rng = random.Random(inp.seed)
    n = 200
    prompt = sum(inp.prompt(rng) for _ in range(n)) / n
    output = sum(inp.output(rng) for _ in range(n)) / n
    c = inp.cost
    alone = c.step_s(round(prompt), prompt * prompt / 2, 0, 0) + output * c.step_s(
        0, 0.0, 1, round(prompt + output / 2)
    )
    return 10 * alone


def _workload(inp: PlanInput, rate: float, one_token: bool = False) -> list[SimRequest]:
    """`inp.requests` requests, and never less than `steady_s` of them."""
    seconds = max(inp.requests / rate, steady_s(inp))
    out = (lambda rng: 1) if one_token else inp.output
    return list(generate(poisson_times([(seconds, rate)], inp.seed), inp.prompt, out, inp.seed))


def holds(inp: PlanInput, config: ClusterConfig, reqs: list[SimRequest]) -> bool:
    res = simulate(inp.cost, config, reqs, inp.ttft_s, inp.tpot_s)
    if res.summary["failed"]:
        return False
    warm = len(res.records) // 10  # the first tenth fills the pipes: not judged
    recs = res.records[warm:]
    ttft = pct([r.ttft_s for r in recs if r.ttft_s is not None], inp.percentile)
    tpot = pct([r.tpot_s for r in recs if r.tpot_s is not None], inp.percentile)
    return (ttft or 0.0) <= inp.ttft_s and (tpot or 0.0) <= inp.tpot_s


def _config(inp: PlanInput, mode: str, prefill: int, decode: int) -> ClusterConfig:
    return ClusterConfig(mode=mode, prefill=prefill, decode=decode, scheduler=inp.scheduler,
                         gpus_per_worker=inp.gpus_per_worker, seed=inp.seed)  # fmt: skip


def _bisect(ok, hi: float, steps: int = 7) -> float:
    """The highest rate in (0, hi] for which ok(rate) holds (0 when not even hi / 2^steps)."""
    lo = 0.0
    for _ in range(8):  # the bound was low: raise it (at most 256x)
        if not ok(hi):
            break
        lo, hi = hi, 2 * hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def capacities(inp: PlanInput, bound: float) -> Capacities:
    """Per-worker capacities (req/s); `bound`: a rough per-worker upper bound to start at."""
    k = inp.pool

    def prefill_ok(rate: float) -> bool:
        return holds(inp, _config(inp, "disaggregated", k, k), _workload(inp, rate * k, True))

    p = _bisect(prefill_ok, bound)
    if p <= 0:
        raise NoConfiguration(_none(inp, "TTFT"))
    plenty = 2 * k

    def decode_ok(rate: float) -> bool:
        cfg = _config(inp, "disaggregated", min(64, math.ceil(plenty * rate / p)), k)
        return holds(inp, cfg, _workload(inp, rate * k))

    d = _bisect(decode_ok, bound)
    if d <= 0:
        raise NoConfiguration(_none(inp, "TPOT"))

    def colocated_ok(rate: float) -> bool:
        return holds(inp, _config(inp, "colocated", k, 0), _workload(inp, rate * k))

    c = _bisect(colocated_ok, bound)
    return Capacities(p / 1.0, d, c)


def _none(inp: PlanInput, what: str) -> str:
    return (
        f"no configuration holds this SLO: {what} p{inp.percentile:g} stays above "
        f"{1000 * (inp.ttft_s if what == 'TTFT' else inp.tpot_s):.0f} ms even at the "
        "lowest load (one request alone is too slow); raise the target or use faster GPUs"
    )


def counts(caps: Capacities, rate: float) -> dict[str, int]:
    if rate <= 0:
        return {"prefill": 0, "decode": 0, "colocated": 0}
    c = math.ceil(rate / caps.colocated - 1e-9) if caps.colocated > 0 else 0
    return {"prefill": math.ceil(rate / caps.prefill - 1e-9),
            "decode": math.ceil(rate / caps.decode - 1e-9), "colocated": c}  # fmt: skip


def plan_rate(inp: PlanInput, caps: Capacities, rate: float, verify_workers: int = 24) -> dict:
    """Counts for `rate`, GPUs and goodput per GPU, disaggregated and colocated; simulated
    whole (both pools at once) when the disaggregated fleet has at most `verify_workers`."""
    n = counts(caps, rate)
    g = inp.gpus_per_worker
    out: dict[str, Any] = {
        "rate": rate,
        **n,
        "gpus_disaggregated": g * (n["prefill"] + n["decode"]),
        "gpus_colocated": g * n["colocated"] if n["colocated"] else None,
    }
    out["goodput_per_gpu_disaggregated"] = rate / out["gpus_disaggregated"] if rate else 0.0
    gc = out["gpus_colocated"]
    out["goodput_per_gpu_colocated"] = rate / gc if gc else 0.0
    total = n["prefill"] + n["decode"]
    if verify_workers and total > 0:
        # the fleet itself when small; else a cell of it, each pool cut in proportion and the
        # rate cut as much as the pool cut the most (the check stays on the safe side)
        f = min(1.0, verify_workers / total)
        p, d = max(1, round(n["prefill"] * f)), max(1, round(n["decode"] * f))
        cell_rate = rate * min(p / n["prefill"], d / n["decode"])
        cfg = _config(inp, "disaggregated", p, d)
        reqs = _workload(replace(inp, requests=2 * inp.requests), cell_rate)
        out["verified"] = {"prefill": p, "decode": d, "rate": cell_rate,
                           "holds": holds(inp, cfg, reqs)}  # fmt: skip
    return out


def plan_day(inp: PlanInput, caps: Capacities, hourly: list[float]) -> dict[str, Any]:
    """Counts hour by hour for a day's rates, GPU-hours disaggregated vs colocated."""
    top = max(range(len(hourly)), key=lambda h: hourly[h])
    hours = [plan_rate(inp, caps, r, verify_workers=24 if h == top else 0)
             for h, r in enumerate(hourly)]  # fmt: skip
    dis = sum(h["gpus_disaggregated"] for h in hours)
    col = sum(h["gpus_colocated"] or 0 for h in hours)
    peak = max(hours, key=lambda h: h["rate"])
    served = sum(hourly) * 3600
    return {"hours": hours, "gpu_hours_disaggregated": dis, "gpu_hours_colocated": col,
            "peak": peak, "requests": served,
            "requests_per_gpu_hour_disaggregated": served / dis if dis else 0.0,
            "requests_per_gpu_hour_colocated": served / col if col else 0.0}  # fmt: skip


def why(inp: PlanInput, caps: Capacities, samples: int = 2000) -> list[str]:
    """The reasons behind the ratio, in the cost model's own numbers."""
    import random

    rng = random.Random(inp.seed)
    prompt = sum(inp.prompt(rng) for _ in range(samples)) / samples
    output = sum(inp.output(rng) for _ in range(samples)) / samples
    c = inp.cost
    prefill_s = c.step_s(round(prompt), prompt * (prompt + 1) / 2, 0, 0)
    # sequences one decode worker holds at its capacity: Little's law at the TPOT target
    # (rate x tokens x time a token), at most the scheduler's max_num_seqs
    lanes = inp.scheduler.max_num_seqs if inp.scheduler else 256
    batch = max(1, min(lanes, round(caps.decode * output * inp.tpot_s)))
    step_s = c.step_s(0, 0.0, batch, round(batch * (prompt + output / 2)))
    lines = [
        f"a prefill worker computes a mean {prompt:.0f}-token prompt in {1000 * prefill_s:.0f} "
        f"ms ({1 / prefill_s:.1f}/s flat out); within the TTFT target at p{inp.percentile:g} "
        f"it takes {caps.prefill:.2f} req/s",
        f"a decode worker at {caps.decode:.2f} req/s of {output:.0f}-token outputs holds up to "
        f"{batch} sequences; a step at that batch takes {1000 * step_s:.1f} ms "
        f"(TPOT target {1000 * inp.tpot_s:.0f} ms)",
        f"so P:D = {caps.decode / caps.prefill:.2f} : 1 (decode capacity over prefill capacity)",
    ]
    disagg = 1 / (1 / caps.prefill + 1 / caps.decode)  # req/s per worker of the pair of pools
    if caps.colocated > 0:
        lines.append(
            f"colocated, every prompt's prefill runs inside the steps its worker's decodes "
            f"wait on: {caps.colocated:.2f} req/s per worker within both targets, against "
            f"{disagg:.2f} per worker disaggregated ({disagg / caps.colocated:.2f}x)"
        )
    else:
        lines.append("colocated holds neither target at any rate: prefill stalls every decode")
    return lines
