"""Paged decode attention for float32 and bfloat16 on CPU, reading K and V out of the pages.

The torch path (engine.attention.paged_decode_attention) gathers each sequence's pages into
a contiguous copy and runs SDPA on it: K and V are read twice and written once per layer.
This kernel walks the block table and reads each K and V row once:

    for each (sequence b, KV head h) in parallel (torch's intra-op threads):
        s[g, t] = scale * q[b, h*G + g] . K[page(t), slot(t), h]     t < context_len[b]
        p = softmax_t(s)                                              (max-subtracted, fp32)
        out[b, h*G + g] = sum_t p[g, t] * V[page(t), slot(t), h]

It is C++ (csrc/paged_decode.cpp: AVX-512 for head dims 64 and 128, portable loops for the
rest) built once per machine with torch's cpp_extension (gcc, -O3 -march=native),
cached under TORCH_EXTENSIONS_DIR; where it cannot be built (no compiler), `load()` says so
once and the torch path is used.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # bf16 K/V are widened to fp32 row by row

_SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"


def _cpu_tag() -> str:
    """A short hash of this CPU's model and flags: a build for -march=native is only loaded
    on the kind of CPU it was built for (a kept cache on another CPU would crash on SIGILL)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:10]


def _source_tag() -> str:
    """A short hash of the kernel's source: an edited source builds anew, not loads a stale
    module built from an older one."""
    return hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:8]


@functools.cache
def load() -> ModuleType | None:
    """The built kernel module, or None (logged once) where it cannot be built."""
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name=f"splitserve_cpu_attention_{_cpu_tag()}_{_source_tag()}",
            cpp_sources=_SOURCE.read_text(),
            functions=["paged_decode"],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja: the torch path serves
        log.warning("splitserve: CPU attention kernel unavailable (%s); using torch's", exc)
        return None


def warm(dtype: torch.dtype, device: torch.device) -> None:
    """Build or load the kernel now if this engine will use it."""
    if dtype in KERNEL_DTYPES and device.type == "cpu":
        load()


def applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """float32 or bfloat16 on CPU with a contiguous cache: what the kernel handles."""
    return (
        q.device.type == "cpu"
        and q.dtype == k_cache.dtype
        and k_cache.dtype in KERNEL_DTYPES
        and k_cache.is_contiguous()
    )


def paged_decode_attention_cpu(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    context_lens: torch.Tensor,  # [B]
    scale: float,
) -> torch.Tensor | None:  # [B, H, D]; None: the kernel does not apply or is not built
    if not (applies(q, k_cache) and v_cache.is_contiguous()):
        return None
    kernel = load()
    if kernel is None:
        return None
    with torch.profiler.record_function("splitserve::paged_decode_cpu"):  # named in profiles
        return kernel.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)


if __name__ == "__main__":  # `make setup` builds it once, so no worker waits for the compiler
    logging.basicConfig(level=logging.INFO)
    print("CPU attention kernel:", "built" if load() is not None else "unavailable (torch path)")
