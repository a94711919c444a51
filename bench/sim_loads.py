"""The loads `bench sim-validate` offers the real system and the simulator alike: a
calibration load and three validation workloads, sized for the machine they run on.

The rates below were sized on a machine whose engine prefilled a 1,024-token prompt in
about 0.4 s (an Intel Xeon with AMX): there the heaviest of them (prefill-heavy) kept its
prefill worker under a third busy. On a slower machine the same rates overload it (a CPU
without AMX took 1.8 s: 126% busy, a queue that only grows), and a simulator's error on a
queue growing without bound says nothing about its model. So every rate is scaled by
`rate_scale`: by default the largest factor at most 1 that keeps every load's prompts
within MAX_PREFILL_LOAD of one prefill worker's time, by the cost model `bench sim-fit`
measured on this machine; each duration is stretched by the inverse, so every load keeps
its number of requests (the same seed gives the same arrivals, spaced out).
"""

from __future__ import annotations

from typing import Any

from engine.errors import InvalidRequestError
from sim.cost import CostModel
from sim.workload import SimRequest, generate, parse_length, poisson_times

# lengths as sim.workload reads them: N, LO-HI (uniform)
# two phases: many short sequences decoding, then few long ones (so the fit can tell the
# cost of a sequence from the cost of its context)
CALIBRATION: list[dict[str, Any]] = [
    {"prompt": "16-96", "output": "64-256", "rate": 1.5, "seconds": 60},
    {"prompt": "256-1024", "output": "8-128", "rate": 0.8, "seconds": 60},
]
WORKLOADS: dict[str, dict[str, Any]] = {
    "chat": {"prompt": "256", "output": "64", "rate": 1.5, "seconds": 100},
    "prefill-heavy": {"prompt": "1024", "output": "16", "rate": 0.7, "seconds": 120},
    "decode-heavy": {"prompt": "64", "output": "256", "rate": 1.0, "seconds": 100},
}
MAX_PREFILL_LOAD = 0.3  # the busiest a load keeps one prefill worker, by the cost model
# The calibration's last phase, sized to the machine instead of scaled: short prompts at the
# rate that keeps about DECODE_STREAMS sequences decoding on the one decode worker by
# `bench sim-fit`'s in-process model (a serving worker steps slower, so it holds more: up
# to 57 on 2026-12-07). The first two phases never held more than 6; the step fit then put
# no cost on a sequence and the simulator missed an overloaded ramp's collapse.
DECODE_PHASE: dict[str, Any] = {"prompt": "16-64", "output": "64-192", "seconds": 60}
DECODE_STREAMS = 24


def mean_prompt(text: str) -> float:
    lo, _, hi = text.partition("-")
    return (int(lo) + int(hi or lo)) / 2


def prefill_load(phase: dict, cost: CostModel) -> float:
    """The fraction of one prefill worker's time the phase's prompts take (at its mean
    prompt, alone on the host)."""
    p = mean_prompt(phase["prompt"])
    return phase["rate"] * cost.step_s(round(p), p * (p + 1) / 2, 0, 0)


def auto_scale(cost: CostModel) -> float:
    phases = [*CALIBRATION, *WORKLOADS.values()]
    heaviest = max(prefill_load(p, cost) for p in phases)
    return min(1.0, MAX_PREFILL_LOAD / heaviest)


def parse_scale(text: str) -> float | None:
    """A factor in (0, 10]; None for `auto`."""
    if text == "auto":
        return None
    try:
        scale = float(text)
    except ValueError:
        scale = 0.0
    if not 0 < scale <= 10:
        raise InvalidRequestError(f"--rate-scale must be auto or a number in (0, 10], got {text!r}")
    return scale


def calibration_load(cost: CostModel) -> list[dict[str, Any]]:
    """CALIBRATION and DECODE_PHASE at its rate here (Little: streams = rate x output
    tokens x step time at that batch and its mean context), which `scale` leaves as is."""
    out = mean_prompt(DECODE_PHASE["output"])
    ctx = mean_prompt(DECODE_PHASE["prompt"]) + out / 2
    step = cost.step_s(0, 0, DECODE_STREAMS, round(DECODE_STREAMS * ctx))
    rate = DECODE_STREAMS / (out * step)
    return [*CALIBRATION, {**DECODE_PHASE, "rate": round(rate, 3), "unscaled": True}]


def requests_of(w: dict | list[dict], seed: int, scale: float = 1.0) -> list[SimRequest]:
    """A load's requests (a list: phases one after another, each its own lengths), every
    rate times `scale` and every duration divided by it (but a phase marked unscaled)."""
    out: list[SimRequest] = []
    start = 0.0
    for i, p in enumerate(w if isinstance(w, list) else [w]):
        k = 1.0 if p.get("unscaled") else scale
        seconds = p["seconds"] / k
        times = poisson_times([(seconds, p["rate"] * k)], seed + i)
        for r in generate(times, parse_length(p["prompt"]), parse_length(p["output"]), seed + i):
            out.append(SimRequest(start + r.arrival_s, r.prompt_tokens, r.output_tokens))
        start += seconds
    return out
