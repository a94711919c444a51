"""Paged decode attention for float32 and bfloat16 on CPU, reading K and V straight out of the pages.

The torch path (engine.attention.paged_decode_attention) gathers each sequence's pages into
a contiguous copy and runs SDPA on it: K and V are read twice and written once per layer.
This kernel walks the block table and reads each K and V row once:

    for each (sequence b, KV head h) in parallel (torch's intra-op threads):
        s[g, t] = scale * q[b, h*G + g] . K[page(t), slot(t), h]     t < context_len[b]
        p = softmax_t(s)                                              (max-subtracted, fp32)
        out[b, h*G + g] = sum_t p[g, t] * V[page(t), slot(t), h]

It is C++ built once per machine with torch's cpp_extension (gcc, -O3 -march=native),
cached under TORCH_EXTENSIONS_DIR; where it cannot be built (no compiler), `load()` says so
once and the torch path is used.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from types import ModuleType

import torch

log = logging.getLogger(__name__)

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # bf16 K/V are widened to fp32 row by row

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// One K or V row as fp32: a copy for bf16 (a shift per element), the row itself for fp32.
static inline const float* row_f32(const float* src, int64_t, float*) { return src; }
static inline const float* row_f32(const c10::BFloat16* src, int64_t D, float* buf) {
  #pragma omp simd
  for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<float>(src[d]);
  return buf;
}

template <typename T>
void paged_decode_impl(const float* qp, const T* kp, const T* vp, const int64_t* tp,
                       const int64_t* lp, float* op, int64_t B, int64_t H, int64_t D,
                       int64_t BS, int64_t KVH, int64_t MB, float sc) {
  const int64_t G = H / KVH;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s, buf(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KVH, h = i % KVH, len = std::min(lp[b], MB * BS);
      s.assign(G * len, 0.f);
      const float* qb = qp + (b * H + h * G) * D;
      for (int64_t t = 0; t < len; ++t) {  // scores: each K row read once, for all G heads
        const float* kr = row_f32(kp + ((tp[b * MB + t / BS] * BS + t % BS) * KVH + h) * D,
                                  D, buf.data());
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qb + g * D;
          float acc = 0.f;
          #pragma omp simd reduction(+:acc)
          for (int64_t d = 0; d < D; ++d) acc += qg[d] * kr[d];
          s[g * len + t] = acc * sc;
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax over t, in place
        float* sg = s.data() + g * len;
        float m = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < len; ++t) m = std::max(m, sg[t]);
        for (int64_t t = 0; t < len; ++t) { sg[t] = std::exp(sg[t] - m); sum += sg[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
      }
      float* ob = op + (b * H + h * G) * D;
      std::fill(ob, ob + G * D, 0.f);
      for (int64_t t = 0; t < len; ++t) {  // weighted V: each V row read once
        const float* vr = row_f32(vp + ((tp[b * MB + t / BS] * BS + t % BS) * KVH + h) * D,
                                  D, buf.data());
        for (int64_t g = 0; g < G; ++g) {
          const float w = s[g * len + t];
          float* og = ob + g * D;
          #pragma omp simd
          for (int64_t d = 0; d < D; ++d) og[d] += w * vr[d];
        }
      }
    }
  });
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  // q: [B, H, D]; caches: [NB, BS, KVH, D] fp32 or bf16; tables: [B, MB]; lens: [B]
  // Scores, softmax and sums run in fp32; the result has q's dtype.
  auto qf = q.to(torch::kFloat).contiguous();
  auto tables = block_tables.to(torch::kLong).contiguous();
  auto lens = context_lens.to(torch::kLong).contiguous();
  auto out = torch::empty_like(qf);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2), MB = tables.size(1);
  const float sc = static_cast<float>(scale);
  if (k_cache.scalar_type() == torch::kBFloat16) {
    paged_decode_impl(qf.data_ptr<float>(), k_cache.data_ptr<c10::BFloat16>(),
                      v_cache.data_ptr<c10::BFloat16>(), tables.data_ptr<int64_t>(),
                      lens.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, D, BS, KVH, MB, sc);
  } else {
    paged_decode_impl(qf.data_ptr<float>(), k_cache.data_ptr<float>(),
                      v_cache.data_ptr<float>(), tables.data_ptr<int64_t>(),
                      lens.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, D, BS, KVH, MB, sc);
  }
  return out.to(q.scalar_type());
}
"""


def _cpu_tag() -> str:
    """A short hash of this CPU's model and flags: a build for -march=native is only loaded
    on the kind of CPU it was built for (a kept cache on another CPU would crash on SIGILL)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:10]


@functools.cache
def load() -> ModuleType | None:
    """The built kernel module, or None (logged once) where it cannot be built."""
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name=f"splitserve_cpu_attention_{_cpu_tag()}",
            cpp_sources=_SOURCE,
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
    return kernel.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)


if __name__ == "__main__":  # `make setup` builds it once, so no worker waits for the compiler
    logging.basicConfig(level=logging.INFO)
    print("CPU attention kernel:", "built" if load() is not None else "unavailable (torch path)")
