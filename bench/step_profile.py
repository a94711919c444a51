"""`splitserve bench step`: where a decode step's time goes, phase by phase and op by op.

B sequences prefilled, then decoding together; for --steps steps each phase is timed:
  schedule   Scheduler.schedule (pure Python)
  prepare    ModelRunner.prepare: the flat batch and attention metadata as tensors
  forward    the decoder layers (embedding, 30 x attention + MLP, final norm)
  logits     lm_head on the sampled rows
  sample     Sampler.sample (argmax / filtered draws, .tolist())
  append     token bookkeeping, stop checks, incremental detokenization
then one torch.profiler pass over a few steps: the top ops by self CPU time.

splitserve bench step --batch-sizes 1 32 --dtype float32
splitserve bench step --batch-sizes 32 --hogs 2   # beside 2 busy processes (bench.cpu_hogs)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from bench.cpu_hogs import cpu_hogs
from bench.roofline import machine_info
from bench.workloads import random_prompts
from engine import LLM, SamplingParams
from engine.engine_config import DTYPE_CHOICES

PHASES = ("schedule", "prepare", "forward", "logits", "sample", "append")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--no-packed-gemm", action="store_true", help="F.linear, for an A/B")
    p.add_argument(
        "--no-fused-decode", action="store_true", help="decode layer by layer, for an A/B"
    )
    p.add_argument(
        "--hogs", type=int, default=0, help="time the steps beside N busy processes (cpu_hogs)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--profile-steps", type=int, default=4, help="0: no torch profiler pass")
    p.add_argument("--top-ops", type=int, default=15)
    p.add_argument("--result-json", type=Path, default=None)


def timed_step(engine) -> dict[str, float]:
    """One engine step, cut at its phases (the marks LLMEngine.step leaves in its stats)."""
    engine.step()
    marks = engine.stats.step_marks
    t = {name: (b - a) * 1000 for name, a, b in zip(PHASES, marks[:-1], marks[1:], strict=True)}
    t["total"] = (marks[-1] - marks[0]) * 1000
    return t


def _start_decoding(engine, batch_size: int, prompt_len: int, max_tokens: int) -> list[str]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompts = random_prompts(batch_size, prompt_len, engine.model_config.vocab_size, batch_size)
    ids = [f"step-b{batch_size}-{i}" for i in range(batch_size)]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    started: set[str] = set()
    while len(started) < batch_size:  # prefill, maybe over several steps
        started.update(o.request_id for o in engine.step())
    return ids


def profile_batch(engine, batch_size: int, args: argparse.Namespace) -> dict[str, Any]:
    budget = args.warmup + args.steps + args.profile_steps + 2
    ids = _start_decoding(engine, batch_size, args.prompt_len, budget)
    for _ in range(args.warmup):
        engine.step()
    samples = [timed_step(engine) for _ in range(args.steps)]
    phases = {k: statistics.median(s[k] for s in samples) for k in (*PHASES, "total")}
    ops: list[dict[str, Any]] = []
    if args.profile_steps:
        ops = _op_table(engine, args.profile_steps, args.top_ops)
    for rid in ids:
        engine.abort(rid)
    return {"batch_size": batch_size, "phases_ms": phases, "top_ops": ops}


def _op_table(engine, steps: int, top: int) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [
        {
            "op": e.key,
            "calls_per_step": e.count / steps,
            "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
            "share": e.self_cpu_time_total / total,
        }
        for e in rows
    ]


def format_result(result: dict[str, Any]) -> str:
    lines = [f"==== decode step breakdown ({result['machine']['cpu_model']}) ===="]
    lines.append(f"{'batch':>6}" + "".join(f"{p:>10}" for p in (*PHASES, "total")) + "  (ms)")
    for r in result["batches"]:
        ph = r["phases_ms"]
        lines.append(
            f"{r['batch_size']:>6}" + "".join(f"{ph[p]:>10.2f}" for p in (*PHASES, "total"))
        )
    for r in result["batches"]:
        if not r["top_ops"]:
            continue
        lines.append(f"-- batch {r['batch_size']}: top ops by self CPU time")
        for op in r["top_ops"]:
            lines.append(
                f"  {op['op'][:40]:<40}{op['calls_per_step']:>8.0f} calls"
                f"{op['self_ms_per_step']:>9.2f} ms{100 * op['share']:>6.1f}%"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_num_seqs=max(args.batch_sizes),
        packed_gemm=not args.no_packed_gemm,
    )
    if args.no_fused_decode:
        llm.engine.runner.fused = None
    result: dict[str, Any] = {
        "machine": machine_info(llm.engine.config.dtype, torch.get_num_threads()),
        "config": {k: str(v) for k, v in vars(args).items() if k != "func"},
    }
    with cpu_hogs(args.hogs):
        result["batches"] = [profile_batch(llm.engine, b, args) for b in args.batch_sizes]
    print(format_result(result))
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(prog="python -m bench.step_profile")
    add_args(parser)
    sys.exit(run(parser.parse_args()))
