"""The four offline experiments; each returns a JSON-ready dict.

    continuous_vs_static  same requests, same max batch: continuous / static tokens/s per cap
    kv_waste              KV slots allocated but empty over the continuous run at the largest cap
    vs_hf                 splitserve (continuous) vs HF `generate` on padded batches, largest cap
    roofline              measured decode step time vs the machine's memory/compute bound

Continuous runs are shared: the LLM that ran a workload for one experiment is
not reloaded, and the same run is not repeated, for the next.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

from bench.roofline import decode_point, measure_peaks
from bench.splitserve_run import EngineSettings, SplitserveRun, make_llm, run_workload
from bench.workloads import (
    Workload,
    continuous_decode_steps,
    padded_decode_tokens,
    ratio,
    static_decode_steps,
)

GOAL_CONTINUOUS_OVER_STATIC = 3.0  # at the largest cap
GOAL_OVER_HF = 3.0
GOAL_KV_WASTE = 0.04


@dataclass(frozen=True, slots=True)
class BenchPlan:
    settings: EngineSettings
    batch_size: int
    workloads: tuple[Workload, ...]  # one per cap, ascending; the last is "the largest cap"
    caps: tuple[int, ...]
    roofline_batches: tuple[int, ...]
    roofline_prompt_len: int
    roofline_warmup: int
    roofline_steps: int
    seed: int
    quick: bool
    progress: bool


class ContinuousRuns:
    """One continuous LLM at `batch_size`, loaded on first use; runs memoized by workload."""

    def __init__(self, plan: BenchPlan):
        self.plan = plan
        self._llm = None
        self._runs: dict[str, SplitserveRun] = {}

    def get(self, workload: Workload) -> SplitserveRun:
        if workload.name not in self._runs:
            if self._llm is None:
                self._llm = make_llm(self.plan.settings, "continuous", self.plan.batch_size)
            self._runs[workload.name] = run_workload(self._llm, workload, self.plan.progress)
        return self._runs[workload.name]

    def close(self) -> None:
        self._llm = None
        gc.collect()


def continuous_vs_static(plan: BenchPlan, continuous: ContinuousRuns) -> dict:
    # Both engines stay loaded and the runs of a cap are back to back, so that drifting load
    # from other work on the machine hits both sides of a ratio alike.
    static_llm = make_llm(plan.settings, "static", plan.batch_size)
    cont, static = [], []
    for w in plan.workloads:
        cont.append(continuous.get(w))
        static.append(run_workload(static_llm, w, plan.progress))
    del static_llm
    gc.collect()
    rows = []
    for cap, w, c, s in zip(plan.caps, plan.workloads, cont, static, strict=True):
        ideal = ratio(
            static_decode_steps(w.output_lens, plan.batch_size),
            continuous_decode_steps(w.output_lens, plan.batch_size),
        )
        rows.append(
            {
                "cap": cap,
                "num_requests": w.num_requests,
                "output_tokens": w.output_tokens,
                "mean_output_len": w.output_tokens / w.num_requests,
                "continuous": c.to_json(),
                "static": s.to_json(),
                "ratio": ratio(c.tokens_per_s, s.tokens_per_s),
                # static steps / continuous steps: the ratio if a step cost the same at any batch
                "ideal_ratio_flat_step_cost": ideal,
            }
        )
    top = float(rows[-1]["ratio"])  # type: ignore[arg-type]
    return {
        "max_num_seqs": plan.batch_size,
        "runs": rows,
        "goal": {
            "cap": plan.caps[-1],
            "min_ratio": GOAL_CONTINUOUS_OVER_STATIC,
            "ratio": top,
            "met": top >= GOAL_CONTINUOUS_OVER_STATIC,
        },
    }


def kv_waste(plan: BenchPlan, continuous: ContinuousRuns) -> dict:
    run = continuous.get(plan.workloads[-1])
    return {
        "block_size": plan.settings.block_size,
        "cap": plan.caps[-1],
        "kv_waste": run.kv_waste,
        "goal": {"max_waste": GOAL_KV_WASTE, "met": run.kv_waste <= GOAL_KV_WASTE},
    }


def vs_hf(plan: BenchPlan, continuous: ContinuousRuns) -> dict:
    from bench.hf_baseline import load_hf_model, run_hf_generate
    from engine.loader import load_tokenizer, resolve_model

    workload = plan.workloads[-1]
    ours = continuous.get(workload)
    continuous.close()
    stops = load_tokenizer(resolve_model(plan.settings.model)).stop_token_ids
    eos = min(stops) if stops else 0
    hf = load_hf_model(plan.settings.model, plan.settings.dtype)
    theirs = run_hf_generate(hf, workload, plan.batch_size, eos, eos, plan.progress)
    del hf
    gc.collect()
    r = ratio(ours.tokens_per_s, theirs.tokens_per_s)
    return {
        "cap": plan.caps[-1],
        "batch_size": plan.batch_size,
        "num_requests": workload.num_requests,
        "splitserve": ours.to_json(),
        "hf": {
            "seconds": theirs.seconds,
            "useful_tokens": theirs.useful_tokens,
            "decoded_tokens": theirs.decoded_tokens,
            "expected_decoded_tokens": padded_decode_tokens(workload.output_lens, plan.batch_size),
            "tokens_per_s": theirs.tokens_per_s,
        },
        "ratio": r,
        "goal": {"min_ratio": GOAL_OVER_HF, "met": r >= GOAL_OVER_HF},
    }


def roofline(plan: BenchPlan) -> dict:
    peaks = measure_peaks(plan.quick)
    llm = make_llm(plan.settings, "continuous", max(plan.roofline_batches))
    points = []
    for b in plan.roofline_batches:
        print(f"roofline: decode steps at batch {b}", flush=True)
        points.append(
            decode_point(
                llm,
                b,
                plan.roofline_prompt_len,
                plan.roofline_warmup,
                plan.roofline_steps,
                plan.seed,
                peaks,
                plan.settings.dtype,
            )
        )
    del llm
    gc.collect()
    return {
        "matmul_gflops": peaks.matmul_gflops,
        "copy_gbs": peaks.copy_gbs,
        "prompt_len": plan.roofline_prompt_len,
        "timed_steps": plan.roofline_steps,
        "points": [p.to_json() for p in points],
    }
