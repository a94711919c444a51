"""`splitserve bench overload`: what bounded admission does for a server offered 10x its capacity.

    server (own `splitserve serve`, or --base-url) ── warm-up
      capacity  closed loop, --capacity-concurrency streams: completed requests/s = capacity
      unloaded  Poisson at --unloaded-fraction x capacity: TTFT / TPOT of a calm server
      overload  Poisson at --overload-factor x capacity for --overload-seconds: outcomes by
                status (bench.overload_client), Retry-After on the 429s, TTFT / TPOT of the
                admitted streams, TPOT p90 overload / unloaded
      cooldown  --cooldown-seconds idle: does memory come back down
    all along: RSS and CPU of router, workers, Ray, client; workers' queues (bench.overload_monitor)

Every request: --input-len random token ids (fresh prompts, no prefix hits), --output-len
tokens with ignore_eos, streamed. The load generator shares the machine's cores with the
server; its CPU use is reported (group "client") so a saturated client is visible.

    splitserve bench overload                                # smollm2-135m, 1 P + 1 D
    splitserve bench overload --max-num-seqs 16 --result-json /tmp/o.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from bench import overload_client as oc
from bench.overload_monitor import GROUPS, ServerMonitor
from bench.serve_datasets import Sample, load_samples
from bench.server_process import ServerProcess
from engine.errors import InvalidRequestError

TPOT_RATIO_BOUND = 1.5  # the acceptance bound on admitted TPOT p90 / unloaded
PHASES = ("capacity", "unloaded", "overload")
_POSITIVE = (
    "input_len",
    "output_len",
    "capacity_concurrency",
    "capacity_requests",
    "unloaded_fraction",
    "unloaded_requests",
    "overload_factor",
    "overload_seconds",
    "burstiness",
    "sample_interval",
    "status_interval",
    "request_timeout",
)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None, help="a running server (default: start one)")
    p.add_argument(
        "--server-pid", type=int, default=None, help="with --base-url: its pid, for router RSS"
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--served-model-name", default=None, help="with --base-url: the model name")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=None, help="server flag (its default)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="server flag")
    p.add_argument("--serve-args", default="", help="more `splitserve serve` flags, one string")
    p.add_argument("--vocab-size", type=int, default=49152, help="prompt ids are drawn below it")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--capacity-concurrency", type=int, default=16)
    p.add_argument("--capacity-requests", type=int, default=64)
    p.add_argument("--unloaded-fraction", type=float, default=0.5)
    p.add_argument("--unloaded-requests", type=int, default=48)
    p.add_argument("--overload-factor", type=float, default=10.0)
    p.add_argument(
        "--overload-rate", type=float, default=None, help="requests/s (default: factor x capacity)"
    )
    p.add_argument("--overload-seconds", type=float, default=30.0)
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1: Poisson)")
    p.add_argument("--cooldown-seconds", type=float, default=5.0)
    p.add_argument("--sample-interval", type=float, default=0.5, help="RSS sampling, seconds")
    p.add_argument("--status-interval", type=float, default=1.0, help="/status polls, seconds")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", type=Path, default=Path("bench/results/overload.json"))


def _validate(args: argparse.Namespace) -> None:
    for name in _POSITIVE:
        if not getattr(args, name) > 0:
            flag = "--" + name.replace("_", "-")
            raise InvalidRequestError(f"{flag} must be positive, got {getattr(args, name)}")
    if args.overload_rate is not None and not args.overload_rate > 0:
        raise InvalidRequestError(f"--overload-rate must be positive, got {args.overload_rate}")


def serve_args(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--dtype", args.dtype]
    out += ["--prefill", str(args.prefill), "--decode", str(args.decode)]
    for flag in ("max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, flag) is not None:
            out += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return out + shlex.split(args.serve_args)


def _samples(args: argparse.Namespace, n: int, phase: int) -> list[Sample]:
    """`n` fresh prompts; a seed per phase, so no phase's prompts hit another's prefix cache."""
    return load_samples(
        "random",
        n,
        token_ids=True,
        seed=args.seed * 1000 + phase,
        random_input_len=args.input_len,
        random_output_len=args.output_len,
        vocab_size=args.vocab_size,
    )


async def _capacity(
    client: oc.OverloadClient, args: argparse.Namespace, log: Any
) -> dict[str, Any]:
    """The closed-loop phase: completed requests/s at --capacity-concurrency streams."""
    records, wall = await oc.closed_loop(
        client, _samples(args, args.capacity_requests, 0), args.capacity_concurrency
    )
    summary = oc.phase_summary(records, wall)
    log(f"capacity: {summary['completed_rate']:.2f} req/s at {args.capacity_concurrency} streams")
    if (refused := args.capacity_requests - summary["counts"]["ok"]) > 0:
        log(
            f"warning: {refused} capacity requests failed or were refused: lower "
            "--capacity-concurrency below the server's admission bound"
        )
    if summary["completed_rate"] <= 0:
        raise InvalidRequestError(f"no request completed: {summary['errors']}")
    return summary


async def _phases(
    args: argparse.Namespace, base_url: str, monitor: ServerMonitor, log: Any
) -> dict[str, Any]:
    client = oc.OverloadClient(oc.client_args(base_url, args))
    out: dict[str, Any] = {}
    try:
        monitor.mark("warmup")
        await oc.closed_loop(client, _samples(args, 4, 9), 2)
        monitor.mark("capacity")
        out["capacity"] = await _capacity(client, args, log)
        capacity = out["capacity"]["completed_rate"]
        overload_rate = args.overload_rate or args.overload_factor * capacity
        rates = {
            "unloaded": (args.unloaded_fraction * capacity, args.unloaded_requests),
            "overload": (overload_rate, max(1, round(overload_rate * args.overload_seconds))),
        }
        for i, (phase, (rate, n)) in enumerate(rates.items(), start=1):
            monitor.mark(phase)
            log(f"{phase}: {n} requests at {rate:.2f} req/s ...")
            times = oc.arrival_times(n, rate, args.burstiness, args.seed + i)
            records, wall = await oc.open_loop(client, _samples(args, n, i), times)
            out[phase] = {"target_rate": rate, **oc.phase_summary(records, wall)}
        monitor.mark("cooldown")
        await asyncio.sleep(args.cooldown_seconds)
    finally:
        await client.close()
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def checks(phases: dict[str, Any]) -> dict[str, Any]:
    """The issue's acceptance points, from the overload phase against the unloaded one."""
    over, calm = phases["overload"], phases["unloaded"]
    c = over["counts"]
    ratio = _ratio(over["tpot_ms"]["p90"], calm["tpot_ms"]["p90"])
    cap = phases["capacity"]
    return {
        # refusals while measuring capacity: the streams pass the admission bound, and the
        # capacity (so every rate after it) is understated
        "capacity_refused": cap["requests"] - cap["counts"]["ok"],
        "http_429s": c["http_429"],
        "every_429_has_retry_after": c["http_429"] > 0 and over["retry_after_share"] == 1.0,
        "no_5xx": c["http_5xx"] == 0,
        "no_connection_errors": c["connection_error"] == 0,
        "no_in_stream_errors": c["overloaded_in_stream"] + c["error_in_stream"] == 0,
        "admitted_complete": c["incomplete"] == 0 and over["all_tokens_share"] in (1.0, None),
        "tpot_p90_ratio": ratio,
        "tpot_p90_within_bound": ratio is not None and ratio <= TPOT_RATIO_BOUND,
    }


def benchmark(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    _validate(args)
    srv = None
    t0 = time.monotonic()
    if args.base_url is None:
        srv = ServerProcess(*serve_args(args))
        log(f"server up in {time.monotonic() - t0:.0f} s at {srv.base}")
    base_url = srv.base if srv is not None else args.base_url
    router_pid = srv.proc.pid if srv is not None else args.server_pid
    monitor = ServerMonitor(base_url, router_pid, args.sample_interval, args.status_interval)
    try:
        monitor.start()
        phases = asyncio.run(_phases(args, base_url, monitor, log))
    finally:
        monitor.stop()
        if srv is not None:
            srv.stop()
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config.pop("func", None)
    return {
        "config": config,
        "serve_args": serve_args(args) if srv is not None else None,
        "host": {"cpus": os.cpu_count(), "note": "server and load generator share these cores"},
        "phases": phases,
        "checks": checks(phases),
        "memory": monitor.memory(),
        "cpu": monitor.cpu(),
        "queues": monitor.queue_stats(),
        "rss_timeline": monitor.samples,
    }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _phase_rows(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{'phase':<10}{'offered/s':>10}{'ok':>6}{'429':>6}{'other':>6}"
        f"{'TTFT p50':>9}{'p90':>7}{'TPOT p50':>9}{'p90':>7}"
    ]
    for name in PHASES:
        p = result["phases"][name]
        other = p["requests"] - p["counts"]["ok"] - p["counts"]["http_429"]
        offered = p["offered_rate"]
        rate = "-" if offered is None or name == "capacity" else f"{offered:.1f}"
        lines.append(
            f"{name:<10}{rate:>10}{p['counts']['ok']:>6}{p['counts']['http_429']:>6}{other:>6}"
            f"{_ms(p['ttft_ms']['median']):>9}{_ms(p['ttft_ms']['p90']):>7}"
            f"{_ms(p['tpot_ms']['median']):>9}{_ms(p['tpot_ms']['p90']):>7}"
        )
    return lines


def _memory_rows(memory: dict[str, Any], cpu: dict[str, Any]) -> list[str]:
    lines = [f"{'RSS peak MB':<12}" + "".join(f"{g:>9}" for g in GROUPS)]
    for phase, groups in memory.items():
        lines.append(f"{phase:<12}" + "".join(f"{groups[g]['peak_mb']:>9.0f}" for g in GROUPS))
    cols = (*GROUPS, "other", "machine")
    lines.append(f"{'cores used':<12}" + "".join(f"{g:>9}" for g in cols) + "  load 1m")
    for phase, cores in cpu.items():
        row = "".join(f"{cores[g]:>9.2f}" for g in cols)
        lines.append(f"{phase:<12}{row}  {cores['load_avg_1m']:.1f}")
    return lines


def format_result(result: dict[str, Any]) -> str:
    over, chk = result["phases"]["overload"], result["checks"]
    cpus = result["host"]["cpus"]
    capacity = result["phases"]["capacity"]["completed_rate"]
    streams = result["config"]["capacity_concurrency"]
    share, ratio = over["retry_after_share"], chk["tpot_p90_ratio"]
    lines = [
        f"==== overload benchmark ({cpus} CPUs, shared by server and load generator) ====",
        f"capacity: {capacity:.2f} req/s ({streams} streams, closed loop)",
        *_phase_rows(result),
        "overload outcomes: " + ", ".join(f"{k} {v}" for k, v in over["counts"].items() if v),
        f"429s with Retry-After: {'-' if share is None else f'{100 * share:.0f}%'}",
        f"admitted TPOT p90 / unloaded: {'-' if ratio is None else f'{ratio:.2f}'} "
        f"(bound {TPOT_RATIO_BOUND})",
        *_memory_rows(result["memory"], result["cpu"]),
        "checks: " + ", ".join(f"{k}={v}" for k, v in chk.items() if k != "tpot_p90_ratio"),
    ]
    lines += [f"overload error: {err}" for err in over["errors"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = benchmark(args)
    print(format_result(result))
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.result_json}")
    return 0


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(prog="python -m bench.overload_bench")
    add_args(parser)
    sys.exit(run(parser.parse_args()))
