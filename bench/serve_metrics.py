"""Serving-benchmark metrics: pure arithmetic on per-request timelines (no I/O, no clock).

A request record is a dict with
    start             when the request was sent (seconds, any common clock)
    first_token_time  when the first chunk carrying output arrived (None if none did)
    token_times       arrival time of every chunk carrying output, in order
    end               when the response was complete (or failed)
    output_tokens     generated tokens, as the server's usage reports them
    success           whether the request completed without error
    error             the error message of a failed request ("" otherwise)

Definitions (successful requests only, except SLO attainment):
    TTFT  first_token_time - start
    E2E   end - start
    TPOT  (E2E - TTFT) / (output_tokens - 1); undefined for 1 output token (left out)
    ITL   every gap between consecutive chunk arrivals (all requests' gaps pooled)
    request throughput       successful requests / duration
    output token throughput  sum of successful requests' output_tokens / duration
    SLO attainment  share of ALL requests (a failed one misses) meeting every given SLO;
                    a request with undefined TPOT (1 token) meets a TPOT SLO
    goodput         requests meeting every SLO / duration
Latency summaries are in milliseconds: mean, median, p90, p99 (linear interpolation).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

PERCENTILES = (90, 99)
SLO_KEYS = ("ttft", "tpot")


def ttft(rec: Mapping[str, Any]) -> float | None:
    """Seconds to the first output chunk, or None if none arrived."""
    first = rec.get("first_token_time")
    if first is None and rec.get("token_times"):
        first = rec["token_times"][0]
    return None if first is None else first - rec["start"]


def e2e(rec: Mapping[str, Any]) -> float:
    return rec["end"] - rec["start"]


def tpot(rec: Mapping[str, Any]) -> float | None:
    """Seconds per output token after the first; None when undefined (<= 1 token, no TTFT)."""
    n, first = rec.get("output_tokens", 0), ttft(rec)
    if n is None or n <= 1 or first is None:
        return None
    return (e2e(rec) - first) / (n - 1)


def itls(rec: Mapping[str, Any]) -> list[float]:
    """Gaps between consecutive chunk arrivals, in seconds."""
    times = list(rec.get("token_times") or [])
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def stats_ms(values_s: Iterable[float]) -> dict[str, float | None]:
    """mean / median / p90 / p99 in milliseconds of values in seconds (None for no values)."""
    arr = np.asarray(list(values_s), dtype=float) * 1000.0
    keys = ["mean", "median", *(f"p{p}" for p in PERCENTILES)]
    if arr.size == 0:
        return dict.fromkeys(keys)
    out: dict[str, float | None] = {"mean": float(arr.mean()), "median": float(np.median(arr))}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    return out


def meets_slos(rec: Mapping[str, Any], slos_ms: Mapping[str, float]) -> bool:
    """True when the request succeeded and meets every given SLO (thresholds in ms)."""
    if not rec.get("success"):
        return False
    if "ttft" in slos_ms:
        t = ttft(rec)
        if t is None or t * 1000.0 > slos_ms["ttft"]:
            return False
    if "tpot" in slos_ms:
        t = tpot(rec)
        if t is not None and t * 1000.0 > slos_ms["tpot"]:
            return False
    return True


def slos_met(records: Sequence[Mapping[str, Any]], slos_ms: Mapping[str, float]) -> int:
    """How many of `records` meet every SLO."""
    return sum(meets_slos(r, slos_ms) for r in records)


def latency_series_ms(records: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """The TTFT of each successful request and every ITL gap of them, in milliseconds."""
    ok = [r for r in records if r.get("success")]
    return {
        "TTFT": [t * 1000 for r in ok if (t := ttft(r)) is not None],
        "ITL": [g * 1000 for r in ok for g in itls(r)],
    }


def summarize(
    records: Sequence[Mapping[str, Any]],
    duration_s: float,
    slos_ms: Mapping[str, float] | None = None,
    max_errors: int = 5,
) -> dict[str, Any]:
    """The benchmark summary of `records` over a run of `duration_s` wall seconds."""
    if duration_s <= 0:
        raise ValueError("duration must be positive")
    ok = [r for r in records if r.get("success")]
    failed = [r for r in records if not r.get("success")]
    errors: list[str] = []
    for r in failed:
        msg = str(r.get("error") or "unknown error")
        if msg not in errors and len(errors) < max_errors:
            errors.append(msg)
    out_tokens = sum(int(r.get("output_tokens") or 0) for r in ok)
    in_tokens = sum(int(r.get("prompt_tokens") or 0) for r in ok)
    summary: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "errors": errors,
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "ttft_ms": stats_ms(t for r in ok if (t := ttft(r)) is not None),
        "tpot_ms": stats_ms(t for r in ok if (t := tpot(r)) is not None),
        "itl_ms": stats_ms(g for r in ok for g in itls(r)),
        "e2e_ms": stats_ms(e2e(r) for r in ok),
    }
    if slos_ms:
        good = slos_met(records, slos_ms)
        summary["slos_ms"] = dict(slos_ms)
        summary["slo_attainment"] = good / len(records) if records else None
        summary["goodput"] = good / duration_s
    return summary
