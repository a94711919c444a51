"""Where TTFT goes, hop by hop: each request's server-side trace (GET /debug/trace/ID) joined
to what the client measured.

    bench serve --hops     after the run: every request's hops (ms) in its record, the
                           median per hop, and how much of the client's TTFT they cover
    bench hops             starts `splitserve serve`, runs `bench serve --hops` at a low and
                           a high load, prints both breakdowns and plots them side by side

The hops up to the first token tile the router's TTFT (router.trace); the client's TTFT adds
the loopback and the HTTP client, so the hop sum is a little under it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path("bench/results")
KEY_ENV = "SPLITSERVE_API_KEY"


async def _fetch(base_url: str, ids: list[str], api_key: str | None) -> list[dict | None]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=30, headers=headers) as c:

        async def one(rid: str) -> dict | None:
            async with sem:
                resp = await c.get(f"/debug/trace/{rid}")
            return resp.json() if resp.status_code == 200 else None

        return await asyncio.gather(*(one(rid) for rid in ids))


def attach_hops(records: list[dict[str, Any]], base_url: str, api_key: str | None) -> None:
    """Each successful record with a response id gets `hops_ms` (its TTFT hops, in order),
    `after_ms` (the hops after the first token) and `server_ttft_ms`."""
    todo = [r for r in records if r.get("success") and r.get("id")]
    traces = asyncio.run(
        _fetch(base_url, [r["id"] for r in todo], api_key or os.environ.get(KEY_ENV))
    )
    for rec, trace in zip(todo, traces, strict=True):
        if trace is None:
            continue
        hops = trace["hops_s"]
        rec["hops_ms"] = {h: 1000 * hops[h] for h in trace["ttft_hops"]}
        rec["after_ms"] = {h: 1000 * v for h, v in hops.items() if h not in rec["hops_ms"]}
        rec["server_ttft_ms"] = None if trace["ttft_s"] is None else 1000 * trace["ttft_s"]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Median per hop, and the hop sum against the client's TTFT (coverage = sum / client)."""
    traced = [r for r in records if r.get("hops_ms") and r.get("first_token_time") is not None]
    if not traced:
        return {"requests": 0}
    order = list(traced[0]["hops_ms"])
    coverage = [
        sum(r["hops_ms"].values()) / (1000 * (r["first_token_time"] - r["start"]))
        for r in traced
    ]  # fmt: skip
    after = sorted({h for r in traced for h in r["after_ms"]})
    return {
        "requests": len(traced),
        "median_ms": {
            h: statistics.median(r["hops_ms"].get(h, 0.0) for r in traced) for h in order
        },
        "after_median_ms": {
            h: statistics.median(r["after_ms"][h] for r in traced if h in r["after_ms"])
            for h in after
        },
        "client_ttft_median_ms": statistics.median(
            1000 * (r["first_token_time"] - r["start"]) for r in traced
        ),
        "coverage_median": statistics.median(coverage),
        "within_5pct": sum(0.95 <= c <= 1.05 for c in coverage) / len(coverage),
    }


def format_summary(s: dict[str, Any], title: str = "TTFT by hop") -> str:
    if not s.get("requests"):
        return f"{title}: no traces (is the server splitserve, and the API key given?)"
    lines = [f"{'-' * 15}{title} (median ms, {s['requests']} requests){'-' * 15}"]
    for hop, ms in s["median_ms"].items():
        lines.append(f"  {hop:<22}{ms:>10.2f}")
    lines.append(f"  {'client TTFT':<22}{s['client_ttft_median_ms']:>10.2f}")
    lines.append(f"  hops / client TTFT: median {s['coverage_median']:.3f}, "
                 f"within 5%: {100 * s['within_5pct']:.0f}% of requests")  # fmt: skip
    for hop, ms in s["after_median_ms"].items():
        lines.append(f"  after: {hop:<15}{ms:>10.2f}")
    return "\n".join(lines)


def plot(loads: dict[str, dict[str, Any]], path: Path) -> None:
    """One stacked bar of median TTFT per load, a segment per hop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, s in loads.items() if s.get("requests")]
    hops = list(dict.fromkeys(h for n in names for h in loads[n]["median_ms"]))
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    bottoms = [0.0] * len(names)
    for hop in hops:
        heights = [loads[n]["median_ms"].get(hop, 0.0) for n in names]
        ax.bar(names, heights, bottom=bottoms, label=hop)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    client = [loads[n]["client_ttft_median_ms"] for n in names]
    ax.scatter(names, client, color="black", marker="_", s=800, zorder=3, label="client TTFT")
    ax.set_ylabel("median ms")
    ax.set_title("Where TTFT goes, hop by hop")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- `splitserve bench hops` -------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serve-args", default="", help="extra `splitserve serve` arguments")
    p.add_argument("--num-prompts", type=int, default=40, help="per load")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--low-rate", type=float, default=0.5, help="req/s of the low load")
    p.add_argument("--high-rate", type=float, default=math.inf, help="req/s of the high load")
    p.add_argument("--high-concurrency", type=int, default=16, help="in flight at the high load")
    p.add_argument("--result-json", type=Path, default=RESULTS / "ttft_hops.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "ttft_hops.png")


def run(args: argparse.Namespace) -> int:
    import shlex

    from bench import serve_bench
    from bench.server_process import ServerProcess

    loads = {
        f"low ({args.low_rate:g} req/s)": {"request_rate": args.low_rate, "max_concurrency": 1},
        f"high ({args.high_concurrency} streams)": {
            "request_rate": args.high_rate, "max_concurrency": args.high_concurrency,
        },
    }  # fmt: skip
    out: dict[str, Any] = {"serve_args": args.serve_args, "loads": {}}
    with ServerProcess(*shlex.split(args.serve_args)) as srv:
        for name, load in loads.items():
            bench_args = serve_bench.default_args(
                base_url=srv.base, num_prompts=args.num_prompts, ignore_eos=True,
                random_input_len=args.input_len, random_output_len=args.output_len,
                no_progress=True, **load,
            )  # fmt: skip
            result = serve_bench.benchmark(bench_args)
            attach_hops(result["requests"], srv.base, None)
            summary = summarize(result["requests"])
            out["loads"][name] = {"serve": result["summary"], "hops": summary}
            print(format_summary(summary, f"TTFT by hop, {name}"))
    args.result_json.parent.mkdir(parents=True, exist_ok=True)
    args.result_json.write_text(json.dumps(out, indent=2) + "\n")
    plot({n: v["hops"] for n, v in out["loads"].items()}, args.plot)
    print(f"wrote {args.result_json} and {args.plot}")
    return 0
