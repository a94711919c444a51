// Fused elementwise ops of the decoder layer (engine/cpu_kernels.py builds this file).
//
// silu_and_mul(x): x = [T, 2I] (gate | up, as gate_up_proj makes it) -> silu(gate) * up, [T, I].
// In fp32 and rounded once to x's dtype: one pass over x, where torch's silu, then mul, read
// and write [T, I] tensors three times. Only bf16 takes it (engine.model): in fp32 the model
// keeps torch's ops, so greedy output stays equal to HF's.
//
// add_rms_norm(x, residual, weight, eps), bf16: residual <- x + residual (rounded to bf16, as
// torch's add rounds), and returns weight * bf16(residual / rms(residual)) with HF's two
// roundings; one pass per row where torch runs eight ops. Only the fp32 sum of squares is
// summed in another order than torch's mean, so a result can differ by one bf16 step.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

#include "items.h"
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

static void add_rms_norm_rows(const c10::BFloat16* x, c10::BFloat16* res, const c10::BFloat16* w,
                              c10::BFloat16* out, int64_t rows, int64_t H, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const c10::BFloat16* xr = x + r * H;
    c10::BFloat16* rr = res + r * H;
    c10::BFloat16* orow = out + r * H;
    float ss = 0.f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= H; i += 16) {
      const __m512 sum = round_bf16(_mm512_add_ps(load16(xr + i), load16(rr + i)));
      store16(rr + i, sum);
      acc = _mm512_fmadd_ps(sum, sum, acc);
    }
    ss = _mm512_reduce_add_ps(acc);
#endif
    for (; i < H; ++i) {
      rr[i] = c10::BFloat16(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
      const float v = static_cast<float>(rr[i]);
      ss += v * v;
    }
    const float rs = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
    i = 0;
#if defined(__AVX512F__)
    const __m512 vrs = _mm512_set1_ps(rs);
    for (; i + 16 <= H; i += 16) {
      const __m512 normed = round_bf16(_mm512_mul_ps(load16(rr + i), vrs));
      store16(orow + i, _mm512_mul_ps(load16(w + i), normed));
    }
#endif
    for (; i < H; ++i) {
      const float normed = static_cast<float>(c10::BFloat16(static_cast<float>(rr[i]) * rs));
      orow[i] = c10::BFloat16(static_cast<float>(w[i]) * normed);
    }
  }
}

void add_rms_norm_rows_bf16(const c10::BFloat16* x, c10::BFloat16* res, const c10::BFloat16* w,
                            c10::BFloat16* out, int64_t rows, int64_t H, float eps) {
  add_rms_norm_rows(x, res, w, out, rows, H, eps);
}

void silu_mul_rows_bf16(const c10::BFloat16* x, c10::BFloat16* out, int64_t rows, int64_t I) {
  silu_mul_rows(x, out, rows, I);
}

torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight,
                           double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && residual.scalar_type() == at::kBFloat16 &&
                  weight.scalar_type() == at::kBFloat16,
              "add_rms_norm: bfloat16");
  TORCH_CHECK(residual.is_contiguous() && x.sizes() == residual.sizes(),
              "add_rms_norm: residual must be contiguous and x's shape");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t H = x.size(-1), T = x.numel() / H;
  auto out = torch::empty_like(residual);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1));
  const auto* xp = x.data_ptr<c10::BFloat16>();
  auto* rp = residual.data_ptr<c10::BFloat16>();
  const auto* wp = weight.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<c10::BFloat16>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    add_rms_norm_rows(xp + begin * H, rp + begin * H, wp, op + begin * H, end - begin, H, e);
  });
  return out;
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
