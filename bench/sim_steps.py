"""The steps the serving workers logged (SPLITSERVE_STEP_LOG: engine.step_log), read for the
simulator's cost model: each step's features and time, and how much of it the host's other
worker spent stepping too (on a decode step, or on one with prompt tokens); the model
fitted to them with the host's two slowdowns (`bench sim-fit --from-steps`, and
bench sim-validate's calibration: bench.sim_calibrate)."""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from sim.cost import FittedCost, fit_knee
from sim.noise import StepNoise

GAP_S = 0.005  # a step that starts within this of the last one's end: back to back
MIN_OVERLAPPED = 10  # steps of one kind of overlap before its share is told apart
FIT_TURNS = 12  # base and shares fitted by turns until the shares move less than 0.1%
LAGS_S = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # the lags `fit_noise` matches the correlation at
TAUS_S = (0.05, 0.3, 2.0, 10.0)  # the lasting components it may use
MIN_NOISE_STEPS = 400  # decode steps before the scatter is fitted
MIN_PREFILL_STEPS = 30  # steps with prompt tokens before theirs is


class Logged(NamedTuple):
    """One logged step: its features, seconds, how many other workers of the host stepped
    beside it and how many of those on prompt tokens (each one's fraction of the step,
    summed: `_overlap`), its start and its worker."""

    features: tuple
    seconds: float
    beside: float = 0.0
    beside_prefill: float = 0.0
    start: float = 0.0
    worker: int = 0

    @property
    def overlap(self) -> float:
        """The fraction of the step during which another worker stepped (at most 1)."""
        return min(1.0, self.beside)

    @property
    def prefill_overlap(self) -> float:
        """The part of that on steps holding prompt tokens."""
        return min(1.0, self.beside_prefill)


def _overlap(others: list[list], start: float, end: float) -> tuple[float, float]:
    """How many other workers stepped during [start, end] (each one's fraction of it,
    summed), and how many on steps holding prompt tokens."""
    busy = prefill = 0.0
    for o in others:
        s, e = o[4], o[4] + o[5]
        if e > start and s < end:
            shared = min(e, end) - max(s, start)
            busy += shared
            prefill += shared if o[0] else 0.0
    span = end - start
    return (busy / span, prefill / span) if span > 0 else (0.0, 0.0)


def read_logs(directory: Path) -> list[list[list]]:
    """Each worker's logged steps ([prompt tokens, their context, decoding sequences, their
    context, start, seconds]) in start order."""
    procs = []
    for path in sorted(Path(directory).glob("steps-*.jsonl")):
        steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        procs.append(sorted(steps, key=lambda s: s[4]))
    return procs


def logged_steps(directory: Path) -> list[Logged]:
    """Every step the workers logged under `directory` (`steps_of`)."""
    return steps_of(read_logs(directory))


def steps_of(procs: list[list[list]]) -> list[Logged]:
    """Each worker's steps (`read_logs`) with the workers beside them. A
    step followed back to back by the next one is timed start to start, so the worker's own
    cost between steps (handing out tokens, taking new requests) counts, as it does on the
    simulated clock. overlap: the fraction of it another worker of the host spent stepping
    too; prefill overlap: the part of that on steps holding prompt tokens. Empty: nothing
    logged."""
    rows: list[Logged] = []
    for i, steps in enumerate(procs):
        others = sorted((s for j, p in enumerate(procs) if j != i for s in p), key=lambda s: s[4])
        starts = [o[4] for o in others]
        for cur, nxt in zip(steps, [*steps[1:], None], strict=True):
            seconds = cur[5]
            if nxt is not None and nxt[4] - (cur[4] + cur[5]) < GAP_S:
                seconds = nxt[4] - cur[4]
            lo = bisect.bisect_left(starts, cur[4] - 5.0)  # no step is longer than 5 s
            hi = bisect.bisect_right(starts, cur[4] + seconds)
            rows.append(
                Logged(
                    tuple(cur[:4]),
                    seconds,
                    *_overlap(others[lo:hi], cur[4], cur[4] + seconds),
                    cur[4],
                    i,
                )
            )
    return rows


def fit_with_contention(rows: list[Logged]) -> tuple[FittedCost, float, float]:
    """The base cost (coefficients and decode knee) and the host's two shares (another
    worker on a decode step, on a step with prompt tokens): a step takes base(features) x
    (1 + (share - 1) x decode overlap + (share_prefill - 1) x prefill overlap), fitted by
    turns (the base on times with the contention taken out, then each share as the median
    slowdown of the steps that overlapped most with that kind; a kind seen too little
    takes the other's share)."""
    share = on_prefill = 1.0
    base = FittedCost({}, 1)
    for _ in range(FIT_TURNS):
        adjusted = [(r.features,
                     r.seconds / slowdown(share, on_prefill, r.overlap, r.prefill_overlap))
                    for r in rows]  # fmt: skip
        coef, knee = fit_knee(adjusted)
        base = FittedCost(coef, 1, decode_knee=knee)
        beside_decode = [r.seconds / base.step_s(*r.features) for r in rows
                         if r.overlap - r.prefill_overlap > 0.8]  # fmt: skip
        beside_prefill = [r.seconds / base.step_s(*r.features) for r in rows
                          if r.prefill_overlap > 0.8]  # fmt: skip
        most = max(beside_decode, beside_prefill, key=len)
        if len(most) < MIN_OVERLAPPED:
            break
        last = (share, on_prefill)
        share, on_prefill = (max(1.0, statistics.median(r if len(r) >= MIN_OVERLAPPED else most))
                             for r in (beside_decode, beside_prefill))  # fmt: skip
        if max(abs(share - last[0]), abs(on_prefill - last[1])) < 1e-3:
            break
    return base, share, on_prefill


def slowdown(share: float, on_prefill: float, overlap: float, prefill_overlap: float) -> float:
    """A logged step's slowdown from the host's other worker: `share` for the part of it
    beside a decode step, `on_prefill` for the part beside a step with prompt tokens."""
    return 1 + (share - 1) * (overlap - prefill_overlap) + (on_prefill - 1) * prefill_overlap


def ratios(cost: FittedCost, rows: list[Logged]) -> list[float]:
    """Each logged step's real time over what `cost` says for it, beside the neighbours it
    had (the host's contention taken out)."""
    share, on_prefill = cost.host_share, cost.share_beside_prefill
    return [r.seconds / (cost.step_s(*r.features)
                         * slowdown(share, on_prefill, r.overlap, r.prefill_overlap))
            for r in rows]  # fmt: skip


def fit_logged(
    directory: Path, base: FittedCost, source: str, scatter: bool = False
) -> tuple[FittedCost, list[Logged]]:
    """The model fitted to the steps logged under `directory` (`scatter`: with the steps'
    scatter about it, `fit_noise`), and those steps' rows."""
    rows = logged_steps(directory)
    if not rows:
        raise SystemExit(f"no steps logged under {directory}")
    fitted, share, on_prefill = fit_with_contention(rows)
    cost = dataclasses.replace(base, coef=fitted.coef, decode_knee=fitted.decode_knee,
                               host_share=share, host_share_prefill=on_prefill,
                               source=source, noise=None)  # fmt: skip
    if scatter:
        cost.noise = fit_noise(cost, rows)
    return cost, rows


def persistence(cost: FittedCost, rows: list[Logged],
                window: int = 100) -> dict[str, float] | None:  # fmt: skip
    """How the decode steps' real / modelled time (the host's contention taken out) scatters
    and how long a slow stretch lasts, in log order: its coefficient of variation, its
    autocorrelation 1 and 10 steps on, and the coefficient of variation of the mean over
    `window` consecutive steps (about a request's life), against what independent steps
    would give (the first over sqrt(window)). None: too few decode steps."""
    r = ratios(cost, [row for row in rows if row.features[2] and not row.features[0]])
    if len(r) < 4 * window:
        return None
    mean, var = statistics.fmean(r), statistics.pvariance(r)

    def lag(k: int) -> float:
        return sum((r[i] - mean) * (r[i + k] - mean) for i in range(len(r) - k)) / (
            (len(r) - k) * var
        )

    means = [statistics.fmean(r[i : i + window]) for i in range(0, len(r) - window + 1, window)]
    cv = var**0.5 / mean
    return {"cv": cv, "lag1": lag(1), "lag10": lag(10), "independent_window_cv": cv / window**0.5,
            "window_cv": statistics.pstdev(means) / statistics.fmean(means)}  # fmt: skip


def fit_noise(cost: FittedCost, rows: list[Logged]) -> StepNoise | None:
    """The steps' scatter about `cost` (the host's contention taken out) as sim.noise's
    parts, from log(real / modelled) about each worker's own mean:
      - the lasting parts: the decode steps' correlation at LAGS_S apart (pooled over the
        workers) matched by a non-negative sum of exp(-lag / tau) over TAUS_S, times their
        variance;
      - white: what those parts, averaged over a median decode step, leave of it;
      - prefill_white: the same for the steps holding prompt tokens, over each one's span
        (None: fewer than MIN_PREFILL_STEPS of them).
    None: fewer than MIN_NOISE_STEPS decode steps."""
    decode, prefill = _log_ratios(cost, rows)
    if sum(map(len, decode)) < MIN_NOISE_STEPS:
        return None
    var = statistics.fmean(x * x for xs in decode for _, x, _ in xs)
    acf = [_correlation(decode, lag) / var for lag in LAGS_S]
    w = _decay_weights(acf)
    comps = tuple((math.sqrt(var * wi), tau) for wi, tau in zip(w, TAUS_S, strict=True)
                  if wi > 1e-3)  # fmt: skip
    lasting = StepNoise(0.0, comps)
    span = statistics.median(d for xs in decode for _, _, d in xs)
    white = math.sqrt(max(0.0, var - lasting.lasting_variance(span)))
    pre = [(x, d) for xs in prefill for _, x, d in xs]
    pw = None
    if len(pre) >= MIN_PREFILL_STEPS:
        left = statistics.fmean(x * x - lasting.lasting_variance(d) for x, d in pre)
        pw = math.sqrt(max(0.0, left))
    return StepNoise(white, comps, pw)


def _log_ratios(cost: FittedCost, rows: list[Logged]) -> tuple[list[list], list[list]]:
    """Per worker, in start order: (start, log(real / modelled) about the worker's mean,
    modelled seconds) of its decode-only steps, and of its steps holding prompt tokens."""
    kinds: tuple[dict, dict] = (defaultdict(list), defaultdict(list))
    for row, q in zip(rows, ratios(cost, rows), strict=True):
        if q > 0 and (row.features[0] or row.features[2]):
            kind = kinds[1] if row.features[0] else kinds[0]
            kind[row.worker].append((row.start, math.log(q), row.seconds / q))
    out: tuple[list[list], list[list]] = ([], [])
    for kind, series in zip(kinds, out, strict=True):
        for xs in kind.values():
            mean = statistics.fmean(x for _, x, _ in xs)
            series.append(sorted((t, x - mean, d) for t, x, d in xs))
    return out


def _correlation(series: list[list], lag: float) -> float:
    """The mean product of a step's value and that of the first step of its worker starting
    `lag` or later after it (within a fifth of the lag, or 50 ms)."""
    total = n = 0.0
    for xs in series:
        ts = [t for t, _, _ in xs]
        for t, x, _ in xs:
            j = bisect.bisect_left(ts, t + lag)
            if j < len(ts) and ts[j] - t - lag < max(0.05, lag / 5):
                total, n = total + x * xs[j][1], n + 1
    return total / n if n else 0.0


def _decay_weights(acf: list[float], sweeps: int = 300) -> list[float]:
    """Non-negative weights w (sum at most 1) with sum_i w_i exp(-lag / tau_i) closest to
    `acf` at LAGS_S in least squares (coordinate descent on w >= 0, then scaled down to a
    sum of 1 if above)."""
    basis = [[math.exp(-lag / tau) for lag in LAGS_S] for tau in TAUS_S]
    w = [0.0] * len(TAUS_S)
    for _ in range(sweeps):
        for i, b in enumerate(basis):
            rest = [a - sum(w[j] * basis[j][k] for j in range(len(w)) if j != i)
                    for k, a in enumerate(acf)]  # fmt: skip
            best = sum(r * e for r, e in zip(rest, b, strict=True)) / sum(e * e for e in b)
            w[i] = max(0.0, best)
    total = sum(w)
    return [x / total for x in w] if total > 1 else w
