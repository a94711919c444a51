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
import random
from dataclasses import dataclass
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
    requests: int = 800  # per simulated point (at least; see steady_s)
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Capacities:
    prefill: float  # requests per second one worker takes within the SLO
    decode: float
    colocated: float


def mean_lengths(inp: PlanInput, samples: int = 200) -> tuple[float, float]:
    """(mean prompt tokens, mean output tokens) of the workload, from `samples` draws."""
    rng = random.Random(inp.seed)
    prompt = sum(inp.prompt(rng) for _ in range(samples)) / samples
    output = sum(inp.output(rng) for _ in range(samples)) / samples
    return prompt, output


def bound_rate(inp: PlanInput) -> float:
    """A rough per-worker rate to start bisecting from: one prompt at a time on one worker."""
    n = mean_lengths(inp)[0]
    return 1.0 / inp.cost.step_s(int(n), n * n / 2, 0, 0)


def steady_s(inp: PlanInput) -> float:
    """Long enough for the pools to settle: five times a mean request's life at no load."""
    prompt, output = mean_lengths(inp)
    c = inp.cost
    alone = c.step_s(round(prompt), prompt * prompt / 2, 0, 0) + output * c.step_s(
        0, 0.0, 1, round(prompt + output / 2)
    )
    return 5 * alone


def _workload(inp: PlanInput, rate: float, one_token: bool = False) -> list[SimRequest]:
    """`inp.requests` requests, and never less than `steady_s` of them."""
    seconds = max(inp.requests / rate, steady_s(inp))
    out = (lambda rng: 1) if one_token else inp.output
    return list(generate(poisson_times([(seconds, rate)], inp.seed), inp.prompt, out, inp.seed))


def judge(inp: PlanInput, config: ClusterConfig, reqs: list[SimRequest]) -> dict[str, Any]:
    """Simulate; the percentiles (after the first tenth, which fills the pipes), failures,
    and whether the SLO holds."""
    res = simulate(inp.cost, config, reqs, inp.ttft_s, inp.tpot_s)
    recs = res.records[len(res.records) // 10 :]
    ttft = pct([r.ttft_s for r in recs if r.ttft_s is not None], inp.percentile) or 0.0
    tpot = pct([r.tpot_s for r in recs if r.tpot_s is not None], inp.percentile) or 0.0
    wait = pct([r.reservation_s or 0.0 for r in recs], inp.percentile) or 0.0
    failed = res.summary["failed"]
    ok = not failed and ttft <= inp.ttft_s and tpot <= inp.tpot_s
    return {"holds": ok, "ttft_s": ttft, "tpot_s": tpot, "reservation_s": wait, "failed": failed}


def holds(inp: PlanInput, config: ClusterConfig, reqs: list[SimRequest]) -> bool:
    return bool(judge(inp, config, reqs)["holds"])


def _config(inp: PlanInput, mode: str, prefill: int, decode: int) -> ClusterConfig:
    return ClusterConfig(mode=mode, prefill=prefill, decode=decode, scheduler=inp.scheduler,
                         gpus_per_worker=inp.gpus_per_worker, seed=inp.seed)  # fmt: skip


def _bisect(ok, hi: float, steps: int = 6) -> float:
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
        out.update(_verify(inp, out, rate, verify_workers))
    if verify_workers and n["colocated"] > 0:
        out.update(_verify_colocated(inp, out, rate, verify_workers))
    return out


def _verify_colocated(inp: PlanInput, out: dict, rate: float, verify_workers: int) -> dict:
    """The colocated count checked the same way: a cell of it, one more worker while the
    SLO breaks; the fleet grows in proportion."""
    C = out["colocated"]  # noqa: N806
    c0 = max(1, min(C, verify_workers))
    c, cell_rate = c0, rate * c0 / C
    reqs = _workload(inp, cell_rate)
    for _ in range(6):
        if holds(inp, _config(inp, "colocated", c, 0), reqs):
            break
        c += 1
    fix: dict[str, Any] = {"verified_colocated": {"colocated": c, "rate": cell_rate,
                                                  "added": c - c0}}  # fmt: skip
    if c > c0:
        fix["colocated"] = math.ceil(C * c / c0 - 1e-9)
        fix["gpus_colocated"] = inp.gpus_per_worker * fix["colocated"]
        fix["goodput_per_gpu_colocated"] = rate / fix["gpus_colocated"]
    return fix


def _verify(inp: PlanInput, out: dict, rate: float, verify_workers: int) -> dict[str, Any]:
    """Both pools simulated together: the fleet itself when small, else a cell of it (each
    pool cut in proportion, the rate cut as much as the pool cut the most). Where the SLO
    breaks, the pool whose target broke gets one more worker in the cell (TTFT: prefill,
    unless waiting for decode KV room is most of it; TPOT: decode), until it holds; the
    fleet's counts grow in proportion."""
    P, D = out["prefill"], out["decode"]  # noqa: N806
    f = min(1.0, verify_workers / (P + D))
    p0, d0 = max(1, round(P * f)), max(1, round(D * f))
    p, d = p0, d0
    cell_rate = rate * min(p / P, d / D)
    reqs = _workload(inp, cell_rate)
    added = {"prefill": 0, "decode": 0}
    for _ in range(6):
        j = judge(inp, _config(inp, "disaggregated", p, d), reqs)
        if j["holds"]:
            break
        decode_short = j["tpot_s"] > inp.tpot_s or j["reservation_s"] > j["ttft_s"] / 2
        if decode_short:
            d, added["decode"] = d + 1, added["decode"] + 1
        else:
            p, added["prefill"] = p + 1, added["prefill"] + 1
    fix: dict[str, Any] = {"verified": {"prefill": p, "decode": d, "rate": cell_rate,
                                        "holds": j["holds"], "added": added}}  # fmt: skip
    if any(added.values()):  # each pool of the fleet grows as its cell did
        fix["prefill"] = math.ceil(P * p / p0 - 1e-9)
        fix["decode"] = math.ceil(D * d / d0 - 1e-9)
        fix["gpus_disaggregated"] = inp.gpus_per_worker * (fix["prefill"] + fix["decode"])
        fix["goodput_per_gpu_disaggregated"] = rate / fix["gpus_disaggregated"]
    return fix


def plan_day(inp: PlanInput, caps: Capacities, hourly: list[float]) -> dict[str, Any]:
    """Counts hour by hour for a day's rates, GPU-hours disaggregated vs colocated. The
    busiest hour is simulated with both pools; where that added workers to a pool, every
    hour's count of that pool grows by the same factor."""
    top = max(range(len(hourly)), key=lambda h: hourly[h])
    peak = plan_rate(inp, caps, hourly[top], verify_workers=16)
    raw = counts(caps, hourly[top])
    pools = ("prefill", "decode", "colocated")
    grow = {pool: peak[pool] / raw[pool] if raw[pool] else 1.0 for pool in pools}
    hours = []
    for h, r in enumerate(hourly):
        if h == top:
            hours.append(peak)
            continue
        plan = plan_rate(inp, caps, r, verify_workers=0)
        for pool, g in grow.items():
            plan[pool] = math.ceil(plan[pool] * g - 1e-9)
        plan["gpus_disaggregated"] = inp.gpus_per_worker * (plan["prefill"] + plan["decode"])
        plan["gpus_colocated"] = inp.gpus_per_worker * plan["colocated"]
        hours.append(plan)
    dis = sum(h["gpus_disaggregated"] for h in hours)
    col = sum(h["gpus_colocated"] or 0 for h in hours)
    served = sum(hourly) * 3600
    return {"hours": hours, "gpu_hours_disaggregated": dis, "gpu_hours_colocated": col,
            "peak": peak, "requests": served,
            "requests_per_gpu_hour_disaggregated": served / dis if dis else 0.0,
            "requests_per_gpu_hour_colocated": served / col if col else 0.0}  # fmt: skip


def why(inp: PlanInput, caps: Capacities, samples: int = 2000) -> list[str]:
    """The reasons behind the ratio, in the cost model's own numbers."""
    prompt, output = mean_lengths(inp, samples)
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
