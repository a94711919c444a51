"""One summary for simulated and real runs alike, so they compare on the same definitions.

A row is a request as its client saw it: {"arrival", "ttft_s", "tpot_s", "end", "error"}
(bench.autoscale_bench writes real runs' records in this form). Percentiles interpolate
linearly between ranks (numpy's default, as bench's serving summary). Goodput: requests
that succeeded within both SLO targets, per second from the first arrival to the last end.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sim.cluster import Record


def row(rec: Record) -> dict[str, Any]:
    return {"arrival": rec.arrival_s, "ttft_s": rec.ttft_s, "tpot_s": rec.tpot_s,
            "end": rec.end_s, "error": rec.error}  # fmt: skip


def pct(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def meets(r: Mapping[str, Any], ttft_s: float, tpot_s: float) -> bool:
    if r.get("error") or r.get("ttft_s") is None or r["ttft_s"] > ttft_s:
        return False
    return r.get("tpot_s") is None or r["tpot_s"] <= tpot_s


def summarize(rows: Iterable[Mapping[str, Any]], ttft_s: float, tpot_s: float) -> dict[str, Any]:
    """TTFT and TPOT p50 / p90 / p99 (ms), goodput and throughput (req/s), failures."""
    rows = list(rows)
    ok = [r for r in rows if not r.get("error")]
    ttfts = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    tpots = [r["tpot_s"] for r in ok if r.get("tpot_s") is not None]
    ends = [r["end"] for r in ok if r.get("end") is not None]
    start = min((r["arrival"] for r in rows), default=0.0)
    span = max(ends, default=start) - start
    met = sum(meets(r, ttft_s, tpot_s) for r in rows)
    out: dict[str, Any] = {"requests": len(rows), "failed": len(rows) - len(ok)}
    for name, vals in (("ttft", ttfts), ("tpot", tpots)):
        for p in (50, 90, 99):
            v = pct(vals, p)
            out[f"{name}_p{p}_ms"] = None if v is None else 1000 * v
    out["attainment"] = met / len(rows) if rows else 0.0
    out["goodput_rps"] = met / span if span > 0 else 0.0
    out["throughput_rps"] = len(ok) / span if span > 0 else 0.0
    return out


def median_of(sums: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each figure's median over several runs' summaries, and its spread: (max - min) /
    median (None where the median is 0)."""
    out, spread = dict(sums[0]), {}
    for k in out:
        vals = [v[k] for v in sums if v.get(k) is not None]
        if vals and isinstance(out[k], int | float):
            out[k] = statistics.median(vals)
            spread[k] = (max(vals) - min(vals)) / out[k] if out[k] else None
    return out, spread


COMPARED = ("ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms", "goodput_rps")


def errors(real: Mapping[str, Any], sim: Mapping[str, Any]) -> dict[str, float | None]:
    """(sim - real) / real for each compared figure (None where either is missing)."""
    out: dict[str, float | None] = {}
    for k in COMPARED:
        a, b = real.get(k), sim.get(k)
        out[k] = None if not a or b is None else (b - a) / a
    return out
