"""`splitserve top`: a live terminal view of a running server, for the operator without Grafana.

Every --interval seconds: GET /status (workers, queues, KV use) and GET /metrics (Prometheus
text, names in vLLM's scheme), then one frame: a header (model, mode, pools, req/s, tok/s), a
worker table and TTFT / TPOT / ITL / E2E percentiles.

scrape ──> Scrape(at_s, status, histograms, counters) ──┐
                                    previous Scrape ────┴──> render_frame() ──> text

Percentiles follow Prometheus' histogram_quantile over the buckets summed across label sets,
for the window between the two scrapes (bucket deltas), or all-time when nothing new arrived
in it (and for `--once`, which scrapes once). Everything but `scrape` and `run_top` is pure.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# (upper bound, cumulative count) per bucket, by upper bound, +Inf last
Buckets = tuple[tuple[float, float], ...]

LATENCIES = (  # (row label, histogram name)
    ("TTFT", "vllm:time_to_first_token_seconds"),
    ("TPOT", "vllm:request_time_per_output_token_seconds"),
    ("ITL", "vllm:inter_token_latency_seconds"),
    ("E2E", "vllm:e2e_request_latency_seconds"),
)
QUANTILES = (0.5, 0.9, 0.99)
REQUESTS = "vllm:request_success_total"  # summed over finished_reason
OUTPUT_TOKENS = "vllm:generation_tokens_total"
CLEAR = "\x1b[H\x1b[2J"  # cursor home, erase the screen
BAR_WIDTH = 10


@dataclass(frozen=True, slots=True)
class Scrape:
    at_s: float  # time.monotonic() when taken
    status: dict[str, Any]  # GET /status
    histograms: dict[str, Buckets]  # GET /metrics, summed over label sets
    counters: dict[str, float]  # sample name (with _total) -> sum over label sets


def parse_metrics(text: str) -> tuple[dict[str, Buckets], dict[str, float]]:
    """Histogram buckets and counters from Prometheus text, each summed over its label sets."""
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    counters: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_bucket") and "le" in s.labels:
                buckets[s.name.removesuffix("_bucket")][float(s.labels["le"])] += s.value
            elif family.type == "counter" and s.name.endswith("_total"):
                counters[s.name] += s.value
    histograms = {name: tuple(sorted(by_le.items())) for name, by_le in buckets.items()}
    return histograms, dict(counters)


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile as Prometheus computes it: find the bucket holding rank q * count and
    interpolate linearly inside it (the first bucket starts at 0); a rank in the +Inf bucket
    gives the highest finite bound. None where Prometheus says NaN (no observations, no +Inf
    bucket, fewer than two buckets)."""
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    b = next(i for i, (_, count) in enumerate(buckets) if count >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    upper, count = buckets[b]
    if b == 0:
        if upper <= 0:
            return upper
        lower, below = 0.0, 0.0
    else:
        lower, below = buckets[b - 1]
    if count <= below:  # q = 0 over an empty first bucket (Prometheus: NaN)
        return lower
    return lower + (upper - lower) * (rank - below) / (count - below)


def window(cur: Buckets, prev: Buckets | None) -> tuple[Buckets, bool]:
    """The buckets observed since `prev` and True; `cur` (all-time) and False when nothing new
    arrived, there is no `prev` scrape, or the counts went down (the server restarted).
    `prev == ()`: the previous scrape had no such series yet (prometheus_client shows a
    labelled histogram from its first observation), so all of `cur` is new."""
    if not cur:
        return cur, False
    if prev == ():
        prev = tuple((le, 0.0) for le, _ in cur)
    if prev is None or [le for le, _ in prev] != [le for le, _ in cur]:
        return cur, False
    delta = tuple((le, c - p) for (le, c), (_, p) in zip(cur, prev, strict=True))
    if delta[-1][1] <= 0 or any(d < 0 for _, d in delta):
        return cur, False
    return delta, True


def rate(name: str, cur: Scrape, prev: Scrape | None) -> float | None:
    """Per second between the two scrapes of counter `name`; None without a window or on a
    reset."""
    if prev is None or cur.at_s <= prev.at_s:
        return None
    delta = cur.counters.get(name, 0.0) - prev.counters.get(name, 0.0)
    return delta / (cur.at_s - prev.at_s) if delta >= 0 else None


def kv_percent(worker: dict[str, Any]) -> float | None:
    used, total = worker.get("kv_blocks_used"), worker.get("kv_blocks_total")
    if used is None or not total:
        return None
    return 100.0 * used / total


def busy_percent(worker: dict[str, Any], cur: Scrape, prev: Scrape | None) -> float | None:
    """Share of wall time the worker's engine spent in steps between the two scrapes."""
    if prev is None or cur.at_s <= prev.at_s or "step_busy_ms" not in worker:
        return None
    name = worker.get("name")
    before = next((w for w in prev.status.get("workers", []) if w.get("name") == name), None)
    if before is None or "step_busy_ms" not in before:
        return None
    busy_ms = worker["step_busy_ms"] - before["step_busy_ms"]
    return 100.0 * busy_ms / ((cur.at_s - prev.at_s) * 1000) if busy_ms >= 0 else None


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _bar(percent: float | None) -> str:
    if percent is None:
        return "-"
    filled = min(BAR_WIDTH, round(percent / 100 * BAR_WIDTH))
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {percent:3.0f}%"


def render_header(cur: Scrape, prev: Scrape | None) -> list[str]:
    st = cur.status
    pools = ", ".join(f"{k} {v}" for k, v in st.get("pools", {}).items()) or "-"
    requests = cur.counters.get(REQUESTS, 0.0)
    tokens = cur.counters.get(OUTPUT_TOKENS, 0.0)
    return [
        f"splitserve top  model {st.get('model', '-')}  mode {st.get('mode', '-')}  pools: {pools}",
        f"requests {requests:.0f} ({_num(rate(REQUESTS, cur, prev), '.2f')} req/s)  "
        f"output tokens {tokens:.0f} ({_num(rate(OUTPUT_TOKENS, cur, prev), '.1f')} tok/s)",
    ]


def render_workers(cur: Scrape, prev: Scrape | None) -> list[str]:
    lines = [
        f"{'worker':<14}{'role':<11}{'state':<10}{'running':>8}{'waiting':>8}{'in flight':>10}"
        f"{'queued':>8}  {'KV used':<17}{'busy':>6}"
    ]
    for w in cur.status.get("workers", []):
        lines.append(
            f"{str(w.get('name', '-')):<14}{str(w.get('role', '-')):<11}"
            f"{str(w.get('state', '-')):<10}{w.get('running', '-'):>8}{w.get('waiting', '-'):>8}"
            f"{w.get('in_flight', '-'):>10}{w.get('queued_tokens', '-'):>8}  "
            f"{_bar(kv_percent(w)):<17}{_percent(busy_percent(w, cur, prev)):>6}"
        )
    return lines


def render_latencies(cur: Scrape, prev: Scrape | None) -> list[str]:
    """p50/p90/p99 in ms per latency; `over` says whether a row is the last window's or,
    with nothing new in it, all-time."""
    lines = [f"{'ms':<8}{'p50':>10}{'p90':>10}{'p99':>10}{'count':>10}  over"]
    for label, name in LATENCIES:
        buckets, in_window = window(cur.histograms.get(name, ()), _hist(prev, name))
        ms = [histogram_quantile(q, buckets) for q in QUANTILES]
        count = buckets[-1][1] if buckets else 0
        cells = "".join(f"{_num(None if v is None else v * 1000, '.1f'):>10}" for v in ms)
        over = f"last {cur.at_s - prev.at_s:.1f} s" if in_window and prev else "all time"
        lines.append(f"{label:<8}{cells}{count:>10.0f}  {over}")
    return lines


def _hist(scrape: Scrape | None, name: str) -> Buckets | None:
    return None if scrape is None else scrape.histograms.get(name, ())


def render_frame(cur: Scrape, prev: Scrape | None = None) -> str:
    """One screen: header, workers, latencies; `prev` (the last scrape) gives the window."""
    parts = [render_header(cur, prev), render_workers(cur, prev), render_latencies(cur, prev)]
    return "\n\n".join("\n".join(lines) for lines in parts) + "\n"


def scrape(url: str, api_key: str | None) -> Scrape:
    """GET /status and /metrics; SplitServeError (one line) if the server is unreachable or
    refuses the key."""
    from router.admin_client import metrics_text, status

    report = status(url, api_key)
    histograms, counters = parse_metrics(metrics_text(url, api_key))
    return Scrape(time.monotonic(), report, histograms, counters)


def run_top(args: argparse.Namespace) -> int:
    """`splitserve top`: frames until Ctrl-C (exit 0), or one with --once; exit 1 with one
    line on stderr when the server cannot be read."""
    from engine.errors import SplitServeError
    from router.access import resolve_api_key

    key = resolve_api_key(args.api_key)
    # Ctrl-C ends it even where the parent left SIGINT ignored (a child inherits that, and
    # Python then installs no KeyboardInterrupt handler): seen under the test runner
    signal.signal(signal.SIGINT, signal.default_int_handler)
    prev: Scrape | None = None
    try:
        while True:
            cur = scrape(args.url, key)
            if args.once:
                sys.stdout.write(render_frame(cur))
                return 0
            sys.stdout.write(CLEAR + render_frame(cur, prev))
            sys.stdout.flush()
            prev = cur
            time.sleep(args.interval)
    except SplitServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
