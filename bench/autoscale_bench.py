"""`splitserve bench autoscale`: a load ramp against a server with the SLO autoscaler on.

Starts `splitserve serve --autoscale ...`, offers Poisson arrivals at a rate that steps
low -> high -> low (--phases "SECONDS:RATE,..."), streams every request, polls /status each
second for the pools (workers by state) and the autoscaler's decisions, and writes a JSON
timeline and a plot: offered load, workers per pool, and SLO attainment per bucket over time.

Attainment outside the transitions: requests that arrived while no pool was changing
(from a decision to its last new worker active or drained, plus the latency window after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import time
from pathlib import Path
from typing import Any

from bench import autoscale_report
from sim.workload import SimRequest, poisson_times

RESULTS = Path("bench/results")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serve-args", default="", help="more `splitserve serve` arguments")
    p.add_argument("--phases", default="60:0.5,120:3,90:0.5", help="SECONDS:REQ_PER_S,...")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=49152, help="prompt ids are drawn below it")
    p.add_argument("--ttft-target-ms", type=float, default=2000.0)
    p.add_argument("--tpot-target-ms", type=float, default=150.0)
    p.add_argument("--interval", type=float, default=5.0, help="autoscaler interval (s)")
    p.add_argument("--cooldown", type=float, default=15.0, help="autoscaler cooldown (s)")
    p.add_argument("--max-workers", type=int, default=2, help="per pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", type=Path, default=RESULTS / "autoscale.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "autoscale.png")


def parse_phases(text: str) -> list[tuple[float, float]]:
    phases = []
    for part in text.split(","):
        seconds, _, rate = part.partition(":")
        try:
            phases.append((float(seconds), float(rate)))
        except ValueError:
            raise SystemExit(f"--phases: bad phase {part!r} (want SECONDS:REQ_PER_S)") from None
    if not phases or any(s <= 0 or r < 0 for s, r in phases):
        raise SystemExit("--phases: each phase needs seconds > 0 and a rate >= 0")
    return phases


def arrivals(phases: list[tuple[float, float]], seed: int) -> list[float]:
    """Poisson arrival times (s from the start) at each phase's rate: sim.workload draws them,
    so the simulator can replay the same run."""
    return list(poisson_times(phases, seed))


async def _request(http: Any, base: str, body: dict, rec: dict) -> None:
    t0 = time.monotonic()
    times = []
    try:
        async with http.stream("POST", f"{base}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}"
                return
            async for line in resp.aiter_lines():
                if line.startswith("data: {") and '"text"' in line:
                    times.append(time.monotonic())
    except Exception as exc:  # noqa: BLE001 - a failed request is a data point
        rec["error"] = repr(exc)
        return
    if times:
        rec["ttft_s"] = times[0] - t0
        rec["tpot_s"] = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    rec["end"] = time.monotonic() - rec["t0"]


async def _drive(base: str, args: argparse.Namespace, times: list[float], t0: float) -> list:
    reqs = [SimRequest(t, args.input_len, args.output_len) for t in times]
    return await drive(base, reqs, args.seed, args.vocab_size, t0)


async def drive(
    base: str, reqs: list[SimRequest], seed: int, vocab_size: int = 49152, t0: float | None = None
) -> list[dict]:
    """Each request at its arrival time (s after t0), streamed from /v1/completions with
    random prompt ids, EOS ignored; records {arrival, ttft_s, tpot_s, error, end}."""
    import httpx

    rng = random.Random(seed + 1)
    records: list[dict] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        model = (await http.get(f"{base}/v1/models")).json()["data"][0]["id"]
        t0 = time.monotonic() if t0 is None else t0
        tasks = []
        for r in reqs:
            await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.monotonic()))
            rec = {"arrival": r.arrival_s, "t0": t0, "ttft_s": None, "tpot_s": None, "error": ""}
            records.append(rec)
            ids = [rng.randrange(1, vocab_size) for _ in range(r.prompt_tokens)]
            body = {"model": model, "prompt": ids, "max_tokens": r.output_tokens,
                    "ignore_eos": True, "stream": True, "temperature": 0.0}  # fmt: skip
            tasks.append(asyncio.create_task(_request(http, base, body, rec)))
        await asyncio.gather(*tasks)
    for rec in records:
        rec.pop("t0")
    return records


async def _poll(status, t0: float, stop: asyncio.Event, out: list) -> None:
    while not stop.is_set():
        try:
            report = await asyncio.to_thread(status)
            out.append({"t": time.monotonic() - t0, **autoscale_report.pools_of(report)})
        except Exception:  # noqa: BLE001, S110 - a missed poll is a gap in the plot
            pass
        await asyncio.sleep(1.0)


def run(args: argparse.Namespace) -> int:
    from bench.server_process import ServerProcess

    phases = parse_phases(args.phases)
    serve = [
        "--autoscale", "--ttft-target-ms", str(args.ttft_target_ms),
        "--tpot-target-ms", str(args.tpot_target_ms), "--autoscale-interval", str(args.interval),
        "--autoscale-cooldown", str(args.cooldown), "--autoscale-window", str(3 * args.interval),
        "--max-prefill", str(args.max_workers), "--max-decode", str(args.max_workers),
        *shlex.split(args.serve_args),
    ]  # fmt: skip
    times = arrivals(phases, args.seed)
    with ServerProcess(*serve) as srv:

        async def main() -> tuple[list, list]:
            polls: list = []
            stop = asyncio.Event()
            t0 = time.monotonic()
            poller = asyncio.create_task(_poll(srv.status, t0, stop, polls))
            records = await _drive(srv.base, args, times, t0)
            stop.set()
            await poller
            return records, polls

        records, polls = asyncio.run(main())
        decisions = srv.status().get("autoscaler", {}).get("decisions", [])
    result = autoscale_report.summarize(records, polls, phases, args)
    result["decisions_last"] = decisions
    args.result_json.parent.mkdir(parents=True, exist_ok=True)
    args.result_json.write_text(json.dumps(result, indent=2) + "\n")
    autoscale_report.plot(result, args.plot)
    print(autoscale_report.format_summary(result))
    print(f"wrote {args.result_json} and {args.plot}")
    return 0
