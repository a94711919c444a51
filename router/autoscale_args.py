"""`splitserve serve` flags of the SLO autoscaler, parsed into planner.AutoscaleConfig.

--autoscale / --no-autoscale (default: off; the pools stay as started or as `splitserve
scale` sets them), --ttft-target-ms, --tpot-target-ms, --slo-percentile, --min-prefill,
--max-prefill, --min-decode, --max-decode, --autoscale-interval, --autoscale-cooldown,
--load-predictor. Bad values: a one-line error before anything starts.
"""

from __future__ import annotations

import argparse

from engine.errors import SplitServeError
from planner import AutoscaleConfig, PoolLimits


def add_autoscale_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SLO autoscaler (disaggregated mode)")
    g.add_argument(
        "--autoscale",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="grow and shrink the prefill pool to hold the TTFT target and the decode pool "
        "to hold the TPOT target (default: off)",
    )
    g.add_argument("--ttft-target-ms", type=float, default=1000.0, help="TTFT SLO (ms)")
    g.add_argument("--tpot-target-ms", type=float, default=100.0, help="TPOT SLO (ms)")
    g.add_argument(
        "--slo-percentile", type=float, default=90.0, help="the SLOs hold at this percentile"
    )
    for pool in ("prefill", "decode"):
        g.add_argument(f"--min-{pool}", type=int, default=1, help=f"fewest {pool} workers")
        g.add_argument(f"--max-{pool}", type=int, default=4, help=f"most {pool} workers")
    g.add_argument(
        "--autoscale-interval", type=float, default=10.0, help="seconds between decisions"
    )
    g.add_argument("--autoscale-window", type=float, default=30.0, help="seconds of latency judged")
    g.add_argument(
        "--autoscale-cooldown", type=float, default=30.0, help="seconds a changed pool is held"
    )
    g.add_argument("--load-predictor", default="ewma", help="constant | ewma")


def autoscale_config(args: argparse.Namespace) -> AutoscaleConfig | None:
    """The autoscaler's config, or None when it is off; SplitServeError for bad values."""
    if not args.autoscale:
        return None
    if getattr(args, "mode", "disaggregated") != "disaggregated":
        raise SplitServeError(
            "--autoscale needs --mode disaggregated (a prefill and a decode pool)"
        )
    config = AutoscaleConfig(
        ttft_target_s=args.ttft_target_ms / 1000,
        tpot_target_s=args.tpot_target_ms / 1000,
        percentile=args.slo_percentile,
        prefill=PoolLimits(args.min_prefill, args.max_prefill),
        decode=PoolLimits(args.min_decode, args.max_decode),
        interval_s=args.autoscale_interval,
        window_s=args.autoscale_window,
        cooldown_s=args.autoscale_cooldown,
        predictor=args.load_predictor,
    )
    for pool, limits in (("prefill", config.prefill), ("decode", config.decode)):
        start = getattr(args, pool, limits.min_workers)
        if limits.clamp(start) != start:
            raise SplitServeError(
                f"--{pool} {start} is outside the autoscaler's bounds "
                f"{limits.min_workers}-{limits.max_workers} (--min-{pool}, --max-{pool})"
            )
    return config
