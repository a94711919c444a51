"""Run one workload through a splitserve `LLM` and measure it (tokens/s, steps, KV waste)."""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import asdict, dataclass

from tqdm import tqdm

from bench.workloads import Workload, random_prompts, tokens_per_s
from engine import LLM, SamplingParams


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """What every splitserve LLM of a benchmark run shares."""

    model: str
    dtype: str
    block_size: int
    threads: int | None
    kv_cache_gb: float


@dataclass(frozen=True, slots=True)
class SplitserveRun:
    scheduling: str
    max_num_seqs: int
    seconds: float
    output_tokens: int
    steps: int
    preemptions: int
    kv_waste: float  # share of allocated KV slots holding no token, over this run's steps
    mean_ttft_s: float
    mean_tpot_s: float
    loadavg_1m: float  # at the end of the run: above ~0 means other work shared the CPU

    @property
    def tokens_per_s(self) -> float:
        return tokens_per_s(self.output_tokens, self.seconds)

    def to_json(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def make_llm(settings: EngineSettings, scheduling: str, max_num_seqs: int) -> LLM:
    """A fresh, warmed-up engine; prefix caching off so reruns of the same prompts cost the same."""
    gc.collect()  # drop the previous engine's KV cache before allocating this one
    llm = LLM(
        model=settings.model,
        dtype=settings.dtype,
        scheduling=scheduling,
        max_num_seqs=max_num_seqs,
        block_size=settings.block_size,
        kv_cache_gb=settings.kv_cache_gb,
        num_threads=settings.threads,
        enable_prefix_caching=False,
    )
    warm_up(llm, max_num_seqs)
    return llm


def warm_up(llm: LLM, max_num_seqs: int, prompt_len: int = 64, max_tokens: int = 8) -> None:
    """One small untimed run: a process's first steps pay one-off kernel and allocator costs."""
    vocab = llm.engine.model_config.vocab_size
    prompts = random_prompts(min(max_num_seqs, 8), prompt_len, vocab, seed=-1)
    llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def run_workload(llm: LLM, workload: Workload, progress: bool = True) -> SplitserveRun:
    """Generate every request of `workload` (greedy, EOS ignored); time the whole run."""
    engine = llm.engine
    if engine.has_unfinished():
        raise RuntimeError("the engine must be idle before a benchmark run")
    cfg = engine.config
    stats0 = (
        engine.stats.steps,
        engine.stats.preemptions,
        engine.stats.kv_slots_allocated,
        engine.stats.kv_slots_filled,
    )
    bar = tqdm(
        total=workload.output_tokens,
        disable=not progress,
        unit="tok",
        desc=f"{cfg.scheduling} {workload.name}",
    )
    t0 = time.perf_counter()
    ids = []
    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
        rid = f"{cfg.scheduling}-{workload.name}-{i}"
        engine.add_request(
            rid,
            prompt,
            SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
            arrival_s=t0,
        )
        ids.append(rid)
    finished: dict = {}
    while engine.has_unfinished():
        outs = engine.step()
        bar.update(len(outs))
        finished.update((o.request_id, o) for o in outs if o.finished)
    seconds = time.perf_counter() - t0
    bar.close()
    outs = [finished[r] for r in ids]
    made = [len(o.token_ids) for o in outs]
    if made != list(workload.output_lens):
        raise RuntimeError(f"{workload.name}: generated lengths differ from the requested ones")
    st = engine.stats
    allocated = st.kv_slots_allocated - stats0[2]
    filled = st.kv_slots_filled - stats0[3]
    tpots = [o.timings.tpot_s for o in outs if o.timings.tpot_s is not None]
    return SplitserveRun(
        scheduling=cfg.scheduling,
        max_num_seqs=cfg.max_num_seqs,
        seconds=seconds,
        output_tokens=sum(made),
        steps=st.steps - stats0[0],
        preemptions=st.preemptions - stats0[1],
        kv_waste=1.0 - filled / allocated if allocated else 0.0,
        mean_ttft_s=statistics.fmean(o.timings.ttft_s for o in outs),
        mean_tpot_s=statistics.fmean(tpots) if tpots else 0.0,
        loadavg_1m=os.getloadavg()[0],
    )
