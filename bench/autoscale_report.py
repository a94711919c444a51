"""The numbers and the plot of `splitserve bench autoscale` (pure: records and polls in)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

BUCKET_S = 10.0
POOLS = ("prefill", "decode")


def pools_of(report: dict[str, Any]) -> dict[str, int]:
    """Workers per pool and state from a /status report: {"decode_active": 2, ...}."""
    out = {f"{p}_{s}": 0 for p in POOLS for s in ("active", "starting", "draining")}
    for w in report.get("workers", []):
        key = f"{w.get('role')}_{w.get('state')}"
        if key in out:
            out[key] += 1
    return out


def transitions(polls: list[dict], settle_s: float) -> list[tuple[float, float]]:
    """Spans while a pool was changing (a worker starting or draining, or its active count
    moving), each extended by `settle_s` after (the latency window catching up)."""
    spans: list[tuple[float, float]] = []
    prev = None
    for poll in polls:
        moving = any(poll[f"{p}_starting"] or poll[f"{p}_draining"] for p in POOLS)
        changed = prev is not None and any(
            poll[f"{p}_active"] != prev[f"{p}_active"] for p in POOLS
        )
        if moving or changed:
            start = prev["t"] if prev is not None else poll["t"]
            end = poll["t"] + settle_s
            if spans and start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], end))
            else:
                spans.append((start, end))
        prev = poll
    return spans


def _ok(rec: dict, ttft_s: float, tpot_s: float) -> bool:
    if rec["error"] or rec["ttft_s"] is None:
        return False
    return rec["ttft_s"] <= ttft_s and (rec["tpot_s"] is None or rec["tpot_s"] <= tpot_s)


def _changes(polls: list[dict], pool: str) -> list[int]:
    counts = [p[f"{pool}_active"] for p in polls]
    return [b - a for a, b in zip(counts, counts[1:], strict=False) if b != a]


def summarize(records: list[dict], polls: list[dict], phases: list, args: argparse.Namespace):
    ttft, tpot = args.ttft_target_ms / 1000, args.tpot_target_ms / 1000
    spans = transitions(polls, settle_s=3 * args.interval)
    outside = [r for r in records if not any(a <= r["arrival"] <= b for a, b in spans)]
    horizon = sum(s for s, _ in phases)
    buckets = []
    for i in range(int(horizon // BUCKET_S) + 1):
        lo = i * BUCKET_S
        inside = [r for r in records if lo <= r["arrival"] < lo + BUCKET_S]
        met = sum(_ok(r, ttft, tpot) for r in inside)
        buckets.append({"t": lo, "offered_per_s": len(inside) / BUCKET_S,
                        "attainment": met / len(inside) if inside else None})  # fmt: skip
    moves = {p: _changes(polls, p) for p in POOLS}
    return {
        "config": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if not callable(v)
        },  # fmt: skip
        "phases": phases,
        "requests": len(records),
        "failed": sum(bool(r["error"]) for r in records),
        "attainment_all": sum(_ok(r, ttft, tpot) for r in records) / max(1, len(records)),
        "attainment_outside_transitions": (
            sum(_ok(r, ttft, tpot) for r in outside) / len(outside) if outside else None
        ),
        "requests_outside_transitions": len(outside),
        "transitions": spans,
        "pool_changes": moves,
        "direction_reversals": {p: _reversals(m) for p, m in moves.items()},
        "max_workers_seen": {p: max((q[f"{p}_active"] for q in polls), default=0) for p in POOLS},
        "buckets": buckets,
        "polls": polls,
        "records": records,
    }


def _reversals(moves: list[int]) -> int:
    signs = [m > 0 for m in moves]
    return sum(a != b for a, b in zip(signs, signs[1:], strict=False))


def format_summary(r: dict) -> str:
    att = r["attainment_outside_transitions"]
    outside = "-" if att is None else f"{100 * att:.1f}%"
    return "\n".join([
        "============ Autoscale ramp ============",
        f"requests {r['requests']}, failed {r['failed']}",
        f"SLO attainment: all {100 * r['attainment_all']:.1f}%, outside transitions "
        f"{outside} ({r['requests_outside_transitions']} requests)",
        f"pool changes: {r['pool_changes']}; direction reversals: {r['direction_reversals']}",
        f"most workers seen: {r['max_workers_seen']}",
    ])  # fmt: skip


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    b = r["buckets"]
    axes[0].step([x["t"] for x in b], [x["offered_per_s"] for x in b], where="post")
    axes[0].set_ylabel("offered req/s")
    polls = r["polls"]
    for pool in POOLS:
        axes[1].step([p["t"] for p in polls], [p[f"{pool}_active"] for p in polls],
                     where="post", label=pool)  # fmt: skip
    axes[1].set_ylabel("active workers")
    axes[1].legend()
    pts = [(x["t"], x["attainment"]) for x in b if x["attainment"] is not None]
    axes[2].plot([t for t, _ in pts], [100 * a for _, a in pts], marker="o")
    axes[2].axhline(90, color="gray", linestyle="--", linewidth=1)
    axes[2].set_ylabel("SLO attainment %")
    axes[2].set_xlabel("seconds")
    for ax in axes:
        for lo, hi in r["transitions"]:
            ax.axvspan(lo, hi, color="orange", alpha=0.15)
        ax.grid(alpha=0.3)
    axes[0].set_title("Load ramp: offered load, pools and SLO attainment (orange: transitions)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
