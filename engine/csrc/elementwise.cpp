// Fused elementwise ops of the decoder layer (engine/cpu_kernels.py builds this file).
//
// silu_and_mul(x): x = [T, 2I] (gate | up, as gate_up_proj makes it) -> silu(gate) * up, [T, I].
// In fp32 and rounded once to x's dtype: one pass over x, where torch's silu, then mul, read
// and write [T, I] tensors three times. Only bf16 takes it (engine.model): in fp32 the model
// keeps torch's ops, so greedy output stays equal to HF's.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

#include "vec512.h"

template <typename T>
static void silu_mul_rows(const T* x, T* out, int64_t rows, int64_t I) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = x + r * 2 * I;
    const T* up = gate + I;
    T* o = out + r * I;
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + 16 <= I; i += 16) {  // silu(g) = g / (1 + e^-g), with e^-|g| only (no overflow)
      const __m512 g = load16(gate + i);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
      const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
      const __m512 num = _mm512_mask_mul_ps(g, neg, g, e);  // g<0: g e^g / (1 + e^g)
      const __m512 silu = _mm512_div_ps(num, _mm512_add_ps(one, e));
      store16(o + i, _mm512_mul_ps(silu, load16(up + i)));
    }
#endif
    for (; i < I; ++i) {
      const float g = static_cast<float>(gate[i]);
      o[i] = static_cast<T>(g / (1.f + std::exp(-g)) * static_cast<float>(up[i]));
    }
  }
}

torch::Tensor silu_and_mul(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "silu_and_mul: x must be [T, 2I]");
  x = x.contiguous();
  const int64_t T = x.size(0), I = x.size(1) / 2;
  auto out = torch::empty({T, I}, x.options());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1));
  auto run = [&](auto* xp, auto* op) {
    at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
      silu_mul_rows(xp + begin * 2 * I, op + begin * I, end - begin, I);
    });
  };
  if (x.scalar_type() == at::kBFloat16) {
    run(x.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "silu_and_mul: float32 or bfloat16");
    run(x.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}
