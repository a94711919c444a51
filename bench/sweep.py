"""`splitserve bench sweep`: goodput of each serving mode under TTFT/TPOT SLOs (DistServe's method).

For each mode (disaggregated 1 prefill + 1 decode, colocated 2 workers, colocated 2 workers
with chunked prefill; always two workers on the same cores) it starts `splitserve serve`,
and for each workload sends `bench serve` load at rising Poisson request rates. A mode's
goodput on a workload is the highest rate at which at least 90% of requests meet both SLOs,
interpolated linearly between the last rate that attains it and the first that does not.

Every mode sees the same prompts at the same rates (one prompt seed per workload and rate,
so a prefix cache never serves one rate's prompts to the next) and one arrival pattern,
stretched to each rate. A point lasts --seconds-per-rate of arrivals. A sweep
of a mode stops at the first rate whose attainment falls below --stop-below; when even the
lowest rate misses the target, the rate is halved (at most twice) to bracket the goodput;
while the highest still attains it, the rate goes on up (x1.5, at most twice).

    splitserve bench sweep                         # all workloads and modes, ~26 min here
    splitserve bench sweep --workloads prefill-heavy --modes disaggregated colocated
    splitserve bench sweep --reanalyze bench/results/sweep/sweep.json --slo tpot:100
"""

from __future__ import annotations

import argparse
import json
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import serve_bench, serve_metrics
from bench.server_process import ServerProcess
from engine.errors import InvalidRequestError

TARGET_ATTAINMENT = 0.9
MAX_HALVINGS = 2
MAX_EXTENSIONS = 2  # rates tried above a workload's grid while every rate attains the target
EXTEND_FACTOR = 1.5


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    serve_args: tuple[str, ...]
    description: str


_TWO_WORKERS = ("--prefill", "1", "--decode", "1")
MODES = {
    m.name: m
    for m in (
        Mode(
            "disaggregated",
            ("--mode", "disaggregated", *_TWO_WORKERS),
            "1 prefill + 1 decode worker, KV over gRPC",
        ),
        Mode(
            "colocated",
            ("--mode", "colocated", *_TWO_WORKERS, "--no-chunked-prefill"),
            "2 workers doing both phases; a prompt is prefilled whole, beside running decodes",
        ),
        Mode(
            "colocated-chunked",
            ("--mode", "colocated", *_TWO_WORKERS, "--max-num-batched-tokens", "256"),
            "2 workers doing both phases; prompts chunked to a 256-token step budget",
        ),
    )
}


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    description: str
    bench: dict[str, Any]  # `bench serve` options (underscored names)
    slos_ms: dict[str, float]
    rates: tuple[float, ...]  # requests/s, ascending


WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            "prefill-heavy",
            "512-token prompts, 16-token outputs; tight TPOT",
            {"dataset": "random", "random_input_len": 512, "random_output_len": 16},
            {"ttft": 5000.0, "tpot": 125.0},
            (0.25, 0.4, 0.55, 0.7),
        ),
        Workload(
            "decode-heavy",
            "32-token prompts, 64-token outputs",
            {"dataset": "random", "random_input_len": 32, "random_output_len": 64},
            {"ttft": 2000.0, "tpot": 150.0},
            (1.0, 2.0, 3.0),
        ),
        Workload(
            "chat",
            "chat mix: lognormal prompts (mean 256 words) and outputs (mean 48), sigma 0.6",
            {
                "dataset": "synthetic-chat",
                "endpoint": "chat",
                "mean_input_len": 256,
                "mean_output_len": 48,
                "sigma": 0.6,
            },
            {"ttft": 4000.0, "tpot": 125.0},
            (0.3, 0.5, 0.7, 0.9),
        ),
    )
}


@dataclass(slots=True)
class Point:
    rate: float
    attainment: float
    summary: dict[str, Any]
    requests: list[dict[str, Any]] = field(repr=False)


def next_rate(
    rates: tuple[float, ...], done: list[tuple[float, float]], stop_below: float
) -> float | None:
    """The next rate to try after the (rate, attainment) points `done`, or None to stop.

    Rates go up from the lowest; the sweep stops at the first attainment below
    `stop_below`. While the lowest rate tried misses the target it is halved (at most
    MAX_HALVINGS times); once a halved rate attains it, the goodput is bracketed. While the
    highest rate still attains it, rates go on past the grid (x EXTEND_FACTOR, at most
    MAX_EXTENSIONS times).
    """
    if not done:
        return rates[0]
    rate, attainment = done[-1]
    if attainment < TARGET_ATTAINMENT and rate == min(r for r, _ in done):
        halvings = sum(r < rates[0] for r, _ in done)
        return rate / 2 if halvings < MAX_HALVINGS else None
    if rate < rates[0] or attainment < stop_below:
        return None
    higher = next((r for r in rates if r > rate), None)
    if higher is None and attainment >= TARGET_ATTAINMENT:
        extensions = sum(r > rates[-1] for r, _ in done)
        return rate * EXTEND_FACTOR if extensions < MAX_EXTENSIONS else None
    return higher


def goodput_at(
    points: list[tuple[float, float]], target: float = TARGET_ATTAINMENT
) -> tuple[float, str]:
    """The highest rate attaining `target`, from (rate, attainment) points; with its kind.

    Kinds: "exact" (interpolated between the last rate that attains the target and the
    first above it that does not), "at least" (every rate attained it: the highest rate is
    a lower bound), "below" (no rate attained it: the lowest rate is an upper bound).
    """
    if not points:
        raise ValueError("no points")
    pts = sorted(points)
    if pts[0][1] < target:
        return pts[0][0], "below"
    for (r0, a0), (r1, a1) in zip(pts, pts[1:], strict=False):
        if a1 < target:
            return r0 + (a0 - target) / (a0 - a1) * (r1 - r0), "exact"
    return pts[-1][0], "at least"


def format_goodput(value: float, kind: str) -> str:
    return {"exact": f"{value:.2f}", "at least": f">= {value:.2f}", "below": f"< {value:.2f}"}[kind]


def num_prompts(rate: float, args: argparse.Namespace) -> int:
    """Enough requests to hold `rate` for --seconds-per-rate, within the prompt bounds.

    The arrivals, not a fixed count, set a point's length: a fixed count at a high rate is a
    burst that ends before the server reaches its steady state, and overstates goodput."""
    return int(min(args.max_prompts, max(args.min_prompts, round(rate * args.seconds_per_rate))))


def _bench_args(
    workload: Workload, rate: float, base_url: str, args: argparse.Namespace
) -> argparse.Namespace:
    return serve_bench.default_args(
        base_url=base_url,
        model=args.model,
        num_prompts=num_prompts(rate, args),
        request_rate=rate,
        ignore_eos=True,  # outputs as long as the workload says, in every mode
        goodput=[f"{k}:{v:g}" for k, v in workload.slos_ms.items()],
        # The same arrival pattern, stretched, at every rate and in every mode; prompts fresh
        # at each rate (a server's prefix cache still holds the last rate's), the same across
        # modes (each mode has its own server).
        seed=args.seed + zlib.crc32(f"{workload.name}@{rate:g}".encode()) % 1_000_000,
        arrival_seed=args.seed,
        no_progress=True,
        timeout=args.request_timeout,
        vocab_size=args.vocab_size,
        **workload.bench,
    )


def _warm_up(base_url: str, args: argparse.Namespace) -> None:
    """A few requests through every worker, so first-call costs stay out of the sweep."""
    warm = serve_bench.default_args(
        base_url=base_url,
        model=args.model,
        num_prompts=4,
        random_input_len=64,
        random_output_len=8,
        ignore_eos=True,
        no_progress=True,
        vocab_size=args.vocab_size,
        seed=args.seed + 1_000_003,  # prompts no workload uses
    )
    serve_bench.benchmark(warm)


def sweep_mode(
    mode: Mode,
    workloads: list[Workload],
    args: argparse.Namespace,
    log=print,
) -> dict[str, list[Point]]:
    """Start splitserve in `mode` and sweep each workload's rates; points by workload."""
    out: dict[str, list[Point]] = {}
    t0 = time.monotonic()
    with ServerProcess(*mode.serve_args, "--dtype", args.dtype, "--model", args.model) as srv:
        log(f"[{mode.name}] server up in {time.monotonic() - t0:.0f} s")
        _warm_up(srv.base, args)
        for w in workloads:
            points: list[Point] = []
            rate = next_rate(w.rates, [], args.stop_below)
            while rate is not None:
                t = time.monotonic()
                result = serve_bench.benchmark(_bench_args(w, rate, srv.base, args))
                s = result["summary"]
                points.append(Point(rate, s["slo_attainment"], s, result["requests"]))
                log(
                    f"[{mode.name}] {w.name} rate {rate:.3g}/s: attainment "
                    f"{100 * s['slo_attainment']:.0f}% of {s['num_requests']} "
                    f"(failed {s['failed']}), TTFT p90 {_ms(s['ttft_ms']['p90'])}, "
                    f"TPOT p90 {_ms(s['tpot_ms']['p90'])}  [{time.monotonic() - t:.0f} s]"
                )
                rate = next_rate(w.rates, [(p.rate, p.attainment) for p in points], args.stop_below)
            out[w.name] = sorted(points, key=lambda p: p.rate)
            srv.wait_no_kv_held()
    return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def goodput_table(
    results: dict[str, dict[str, list[Point]]], workloads: list[Workload]
) -> dict[str, dict[str, Any]]:
    """Per workload: each mode's goodput (value, kind) and disaggregated / colocated ratios."""
    table: dict[str, dict[str, Any]] = {}
    for w in workloads:
        row: dict[str, Any] = {"goodput": {}, "ratios": {}}
        for mode, by_workload in results.items():
            pts = by_workload.get(w.name)
            if pts:
                row["goodput"][mode] = goodput_at([(p.rate, p.attainment) for p in pts])
        disagg = row["goodput"].get("disaggregated")
        for mode, (value, _kind) in row["goodput"].items():
            if mode != "disaggregated" and disagg is not None and value > 0:
                row["ratios"][mode] = disagg[0] / value
        table[w.name] = row
    return table


def format_table(table: dict[str, dict[str, Any]], workloads: list[Workload]) -> str:
    lines = [f"goodput (req/s at {TARGET_ATTAINMENT:.0%} SLO attainment)"]
    for w in workloads:
        row = table[w.name]
        slos = ", ".join(f"{k.upper()} <= {v:g} ms" for k, v in w.slos_ms.items())
        lines.append(f"{w.name} ({w.description}; {slos})")
        for mode, (value, kind) in row["goodput"].items():
            ratio = row["ratios"].get(mode)
            extra = f"   disaggregated / {mode} = {ratio:.2f}x" if ratio else ""
            lines.append(f"  {mode:<20}{format_goodput(value, kind):>10}{extra}")
    return "\n".join(lines)


def plot_sweep(
    results: dict[str, dict[str, list[Point]]], workloads: list[Workload], out_dir: Path
) -> list[Path]:
    """Per workload: attainment against rate per mode, and TTFT / ITL CDFs at a common rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for w in workloads:
        by_mode = {m: r[w.name] for m, r in results.items() if r.get(w.name)}
        if not by_mode:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        ax = axes[0]
        for mode, pts in by_mode.items():
            ax.plot([p.rate for p in pts], [100 * p.attainment for p in pts], "o-", label=mode)
        ax.axhline(100 * TARGET_ATTAINMENT, color="grey", ls="--", lw=1)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 105)
        ax.set_title(f"{w.name}: SLO attainment")
        ax.legend()
        common = set.intersection(*({p.rate for p in pts} for pts in by_mode.values()))
        rate = max(common) if common else None
        series = {m: serve_metrics.latency_series_ms(p.requests) for m, p in _at(by_mode, rate)}
        for ax, name in zip(axes[1:], ("TTFT", "ITL"), strict=True):
            for mode, values in series.items():
                serve_bench.step_cdf(ax, values[name], label=mode)
            slo = w.slos_ms.get("ttft") if name == "TTFT" else None
            if slo:
                ax.axvline(slo, color="grey", ls="--", lw=1)
            ax.set_xlabel(f"{name} (ms)")
            ax.set_ylabel("CDF")
            ax.set_title(f"{name} CDF at {rate:g} req/s" if rate else f"{name} CDF")
            ax.legend()
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"sweep_{w.name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _at(by_mode: dict[str, list[Point]], rate: float | None) -> list[tuple[str, Point]]:
    """Each mode's point at `rate`, for the modes that ran it."""
    return [(m, p) for m, pts in by_mode.items() for p in pts if p.rate == rate]


# ---- CLI -------------------------------------------------------------------------------------


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument(
        "--vocab-size", type=int, default=49152, help="random token ids are drawn below this"
    )
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), metavar="NAME")
    p.add_argument("--modes", nargs="+", default=list(MODES), metavar="NAME")
    p.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=None,
        help="request rates for every workload (default: each workload's own)",
    )
    p.add_argument("--seconds-per-rate", type=float, default=30.0, help="arrivals per rate point")
    p.add_argument("--min-prompts", type=int, default=14)
    p.add_argument(
        "--max-prompts",
        type=int,
        default=400,
        help="a safety cap; a lower one cuts high rates short of steady state",
    )
    p.add_argument(
        "--stop-below",
        type=float,
        default=0.7,
        help="stop a mode's sweep at the first rate with attainment below this",
    )
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("bench/results/sweep"))
    p.add_argument(
        "--reanalyze",
        type=Path,
        default=None,
        metavar="SWEEP_JSON",
        help="no servers: the goodput table of a saved sweep.json, under --slo if given",
    )
    p.add_argument(
        "--slo", nargs="+", default=None, metavar="KEY:MS", help="with --reanalyze: ttft:MS tpot:MS"
    )


def _validate(args: argparse.Namespace) -> tuple[list[Mode], list[Workload]]:
    for name, known in (("workload", WORKLOADS), ("mode", MODES)):
        for item in getattr(args, f"{name}s"):
            if item not in known:
                raise InvalidRequestError(
                    f"unknown {name} {item!r}; choose from {', '.join(known)}"
                )
    if args.rates is not None and not all(r > 0 and math.isfinite(r) for r in args.rates):
        raise InvalidRequestError(f"--rates must be positive and finite, got {args.rates}")
    if args.seconds_per_rate <= 0 or args.min_prompts <= 0 or args.max_prompts < args.min_prompts:
        raise InvalidRequestError(
            "--seconds-per-rate and --min-prompts must be positive, --max-prompts >= --min-prompts"
        )
    workloads = [WORKLOADS[n] for n in args.workloads]
    if args.rates is not None:
        rates = tuple(sorted(args.rates))
        workloads = [Workload(w.name, w.description, w.bench, w.slos_ms, rates) for w in workloads]
    return [MODES[n] for n in args.modes], workloads


def reanalyze(path: Path, slos_override: dict[str, float]) -> str:
    """The goodput table of a saved sweep under other SLOs, from its per-request records.

    The sweep chose its rates under its own SLOs, so a looser SLO may find no rate that
    misses it (goodput "at least")."""
    try:
        doc = json.loads(Path(path).read_text())
        saved = doc["workloads"]
        points = doc["points"]
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidRequestError(f"cannot read a sweep result from {path}: {exc}") from None
    workloads = [
        Workload(name, w["description"], w["bench"], {**w["slos_ms"], **slos_override},
                 tuple(w["rates"]))
        for name, w in saved.items()
    ]  # fmt: skip
    results: dict[str, dict[str, list[Point]]] = {}
    for mode, by_workload in points.items():
        results[mode] = {}
        for w in workloads:
            results[mode][w.name] = [
                Point(
                    p["rate"],
                    serve_metrics.slos_met(p["requests"], w.slos_ms) / len(p["requests"]),
                    p["summary"],
                    p["requests"],
                )
                for p in by_workload.get(w.name, [])
            ]
    return format_table(goodput_table(results, workloads), workloads)


def run(args: argparse.Namespace) -> int:
    if args.reanalyze is not None:
        print(reanalyze(args.reanalyze, serve_bench.parse_goodput(args.slo)))
        return 0
    modes, workloads = _validate(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    results: dict[str, dict[str, list[Point]]] = {}
    for mode in modes:
        results[mode.name] = sweep_mode(mode, workloads, args, log=lambda m: print(m, flush=True))
    elapsed = time.monotonic() - t0
    table = goodput_table(results, workloads)
    print(format_table(table, workloads))
    print(f"sweep took {elapsed / 60:.1f} min")
    doc = {
        "config": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if not callable(v)
        },
        "elapsed_s": elapsed,
        "modes": {
            m.name: {"serve_args": m.serve_args, "description": m.description} for m in modes
        },
        "workloads": {
            w.name: {
                "description": w.description,
                "bench": w.bench,
                "slos_ms": w.slos_ms,
                "rates": w.rates,
            }
            for w in workloads
        },
        "goodput": {
            w: {m: {"req_per_s": v, "kind": k} for m, (v, k) in row["goodput"].items()}
            | {"ratios": row["ratios"]}
            for w, row in table.items()
        },
        "points": {
            mode: {
                w: [
                    {
                        "rate": p.rate,
                        "attainment": p.attainment,
                        "summary": p.summary,
                        "requests": p.requests,
                    }
                    for p in pts
                ]
                for w, pts in by_w.items()
            }
            for mode, by_w in results.items()
        },
    }
    path = args.out_dir / "sweep.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    for plot in plot_sweep(results, workloads, args.out_dir):
        print(f"wrote {plot}")
    return 0
