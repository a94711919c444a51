"""Roofline of decode on this machine: measured peaks, measured step times, and the bound.

peak:  large torch.matmul (GFLOP/s, per dtype) and a large tensor copy (GB/s)
step:  time `engine.step()` while `batch` sequences all decode (after prefill)
bound: max(bytes / bandwidth, flops / peak) with
       bytes = weight bytes + KV bytes read, flops = 2 * params * batch + attention
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from engine.config import ModelConfig
from engine.profile import median_decode_step_s


@dataclass(frozen=True, slots=True)
class MachinePeaks:
    matmul_gflops: dict[str, float]  # dtype name -> GFLOP/s
    copy_gbs: float  # bytes read + written per second, over a copy far larger than the caches


@dataclass(frozen=True, slots=True)
class DecodeStepPoint:
    batch_size: int
    context_len: float  # mean tokens of KV each sequence attends to over the timed steps
    step_s: float  # median measured step time
    weight_bytes: int
    kv_bytes: int
    flops: float
    bound_s: float  # max(bytes / bandwidth, flops / peak)
    bound_by: str  # "memory" | "compute"

    @property
    def fraction_of_bound(self) -> float:
        """bound / actual: 1.0 means the step runs at the machine's limit."""
        return self.bound_s / self.step_s if self.step_s > 0 else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "fraction_of_bound": self.fraction_of_bound}


def machine_info(dtype: str, threads: int) -> dict:
    """CPU model, cores, torch version and the run's dtype and thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "torch_version": torch.__version__,
        "dtype": dtype,
        "threads": threads,
        "python": platform.python_version(),
        # Other work on the machine skews every figure: 1-minute load average at the start.
        "loadavg_1m_start": os.getloadavg()[0],
    }


def _best_time(fn, repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of an n x n x n torch.matmul."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    return 2 * n**3 / _best_time(lambda: torch.matmul(a, b), repeats) / 1e9


def copy_gbs(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best-of-`repeats` GB/s (read + write) of copying `nbytes` between two tensors."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_time(lambda: dst.copy_(src), repeats) / 1e9


def measure_peaks(quick: bool = False) -> MachinePeaks:
    n = 1024 if quick else 2048
    gflops = {
        name: matmul_gflops(dt, n)
        for name, dt in (("bfloat16", torch.bfloat16), ("float32", torch.float32))
    }
    return MachinePeaks(gflops, copy_gbs(256 * 2**20 if quick else 512 * 2**20))


def model_weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter count, bytes) with tied tensors counted once."""
    params = {p.data_ptr(): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def step_bound(
    cfg: ModelConfig,
    num_params: int,
    weight_bytes: int,
    itemsize: int,
    batch_size: int,
    context_len: float,
    peaks: MachinePeaks,
    dtype: str,
) -> tuple[int, float, float, str]:
    """(KV bytes read, flops, bound seconds, what binds) for one decode step."""
    kv_bytes = int(
        batch_size * context_len * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize
    )
    # QK^T and PV: 2 flops per multiply-add, over every head and context token.
    attn_flops = 4 * batch_size * cfg.num_layers * cfg.num_heads * cfg.head_dim * context_len
    flops = 2 * num_params * batch_size + attn_flops
    memory_s = (weight_bytes + kv_bytes) / (peaks.copy_gbs * 1e9)
    compute_s = flops / (peaks.matmul_gflops[dtype] * 1e9)
    bound_by = "memory" if memory_s >= compute_s else "compute"
    return kv_bytes, flops, max(memory_s, compute_s), bound_by


def time_decode_steps(llm, batch_size: int, prompt_len: int, warmup: int, steps: int, seed: int):
    """Median step time and mean context length while `batch_size` sequences all decode."""
    from bench.workloads import random_prompts

    engine = llm.engine
    if engine.has_unfinished():
        raise RuntimeError("the engine must be idle before timing decode steps")
    prompts = random_prompts(batch_size, prompt_len, engine.model_config.vocab_size, seed)
    step_s = median_decode_step_s(engine, prompts, f"roofline-b{batch_size}", warmup, steps)
    context = prompt_len + 1 + warmup + (steps + 1) / 2
    return step_s, context


def decode_point(
    llm,
    batch_size: int,
    prompt_len: int,
    warmup: int,
    steps: int,
    seed: int,
    peaks: MachinePeaks,
    dtype: str,
) -> DecodeStepPoint:
    step_s, context = time_decode_steps(llm, batch_size, prompt_len, warmup, steps, seed)
    num_params, weight_bytes = model_weight_bytes(llm.engine.runner.model)
    itemsize = llm.engine.config.torch_dtype.itemsize
    kv_bytes, flops, bound_s, bound_by = step_bound(
        llm.engine.model_config,
        num_params,
        weight_bytes,
        itemsize,
        batch_size,
        context,
        peaks,
        dtype,
    )
    return DecodeStepPoint(
        batch_size, context, step_s, weight_bytes, kv_bytes, flops, bound_s, bound_by
    )
