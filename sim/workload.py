"""What the simulated cluster is offered: requests with an arrival time and two lengths.

    lengths:  "128" (every request), "64-512" (uniform), "lognormal:MEAN:CV" (mean, and the
              standard deviation over the mean), each at least 1 token
    arrivals: Poisson at a rate that steps through phases ("SECONDS:REQ_PER_S,..."), or a
              diurnal day (a sine between a trough and a peak, compressed into `seconds`),
              or a trace file (JSON lines or CSV: arrival_s, prompt_tokens, output_tokens)

Requests are produced lazily, in arrival order: an hour of a thousand GPUs' traffic is
millions of requests, never all in memory at once.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class SimRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


Length = Callable[[random.Random], int]


def parse_length(text: str, what: str = "length") -> Length:
    """A length distribution from its text form (see the module docstring)."""
    text = str(text).strip()
    try:
        if text.startswith("lognormal:"):
            mean, cv = (float(x) for x in text.split(":")[1:3])
            if mean < 1 or cv < 0:
                raise ValueError
            sigma = math.sqrt(math.log(1 + cv * cv))
            mu = math.log(mean) - sigma * sigma / 2
            return lambda rng: max(1, round(rng.lognormvariate(mu, sigma)))
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            if not 1 <= lo <= hi:
                raise ValueError
            return lambda rng: rng.randint(lo, hi)
        n = int(text)
        if n < 1:
            raise ValueError
        return lambda rng: n
    except ValueError:
        raise InvalidRequestError(
            f"bad {what} {text!r}: want N, LO-HI or lognormal:MEAN:CV, lengths at least 1"
        ) from None


def parse_phases(text: str) -> list[tuple[float, float]]:
    """ "SECONDS:REQ_PER_S,..." -> [(seconds, rate)]."""
    phases = []
    for part in str(text).split(","):
        seconds, _, rate = part.partition(":")
        try:
            phases.append((float(seconds), float(rate)))
        except ValueError:
            raise InvalidRequestError(f"bad phase {part!r}: want SECONDS:REQ_PER_S") from None
    if not phases or any(not (s > 0 and r >= 0) for s, r in phases):
        raise InvalidRequestError("each phase needs seconds > 0 and a rate >= 0")
    return phases


def poisson_times(phases: list[tuple[float, float]], seed: int) -> Iterator[float]:
    """Poisson arrival times at each phase's rate, as bench.autoscale_bench draws them (the
    same seed gives the same times, so a real run and its simulation see one workload)."""
    rng, start = random.Random(seed), 0.0
    for seconds, rate in phases:
        t = start
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= start + seconds:
                break
            yield t
        start += seconds


def diurnal_times(
    peak_rate: float, seconds: float, trough: float = 0.3, seed: int = 0
) -> Iterator[float]:
    """A day compressed into `seconds`: the rate follows a sine from trough x peak at the
    start (night) to the peak at the middle (afternoon) and back. Non-homogeneous Poisson,
    drawn by thinning (Lewis and Shedler, 1979)."""
    if not (peak_rate > 0 and seconds > 0 and 0 <= trough <= 1):
        raise InvalidRequestError("diurnal: need a peak rate > 0, seconds > 0, trough in [0, 1]")
    rng, t = random.Random(seed), 0.0
    while True:
        t += rng.expovariate(peak_rate)
        if t >= seconds:
            return
        if rng.random() <= diurnal_rate(t, peak_rate, seconds, trough) / peak_rate:
            yield t


def diurnal_rate(t: float, peak_rate: float, seconds: float, trough: float) -> float:
    return peak_rate * (trough + (1 - trough) * (1 - math.cos(2 * math.pi * t / seconds)) / 2)


def generate(
    times: Iterable[float], prompt: Length, output: Length, seed: int
) -> Iterator[SimRequest]:
    rng = random.Random(seed + 1)
    for t in times:
        yield SimRequest(t, prompt(rng), output(rng))


def load_trace(path: Path) -> list[SimRequest]:
    """A trace file: JSON lines or CSV with arrival_s, prompt_tokens, output_tokens."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read trace {path}: {exc.strerror}") from None
    rows: list[dict] = []
    try:
        if text.lstrip().startswith("{"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(text.splitlines()))
        reqs = [
            SimRequest(float(r["arrival_s"]), int(r["prompt_tokens"]), int(r["output_tokens"]))
            for r in rows
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRequestError(
            f"bad trace {path}: each row needs arrival_s, prompt_tokens, output_tokens ({exc})"
        ) from None
    if not reqs:
        raise InvalidRequestError(f"the trace {path} has no requests")
    if any(r.prompt_tokens < 1 or r.output_tokens < 1 or r.arrival_s < 0 for r in reqs):
        raise InvalidRequestError(f"bad trace {path}: lengths must be >= 1, arrivals >= 0")
    return sorted(reqs, key=lambda r: r.arrival_s)
