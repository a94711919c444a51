// Rotary embedding and the KV-cache write of a decoder layer, in one pass (bf16;
// engine/model.py takes it, engine/cpu_kernels.py builds it).
//
// rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, H, KVH):
//   qkv [T, (H + 2 KVH) D], the qkv projection's output (q heads | k heads | v heads);
//   cos, sin [T, D] for the tokens' positions (sin's first half negated: rotate-half is a roll);
//   k_cache, v_cache [blocks, block_size, KVH, D]; slots [T] int64 (block * block_size + offset).
// q and k are roped in place, with torch's three bf16 roundings of x * cos + roll(x) * sin
// (the same values as engine.model.apply_rope), then each token's k and v go to its slot.
// It replaces a dozen small torch ops a layer (mul, roll, add, split, two index_copy_).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "items.h"
#include "vec512.h"

namespace {
using bf16 = c10::BFloat16;

inline float rb(float v) { return static_cast<float>(bf16(v)); }

// One head of D values, roped in place.
void rope_head(bf16* x, const bf16* cos, const bf16* sin, int64_t D) {
  const int64_t half = D / 2;
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; half % 16 == 0 && i < half; i += 16) {
    const __m512 a = load16(x + i), b = load16(x + half + i);
    const __m512 lo = _mm512_add_ps(round_bf16(_mm512_mul_ps(a, load16(cos + i))),
                                    round_bf16(_mm512_mul_ps(b, load16(sin + i))));
    const __m512 hi = _mm512_add_ps(round_bf16(_mm512_mul_ps(b, load16(cos + half + i))),
                                    round_bf16(_mm512_mul_ps(a, load16(sin + half + i))));
    store16(x + i, lo);
    store16(x + half + i, hi);
  }
#endif
  for (; i < half; ++i) {
    const float a = x[i], b = x[half + i];
    x[i] = bf16(rb(a * static_cast<float>(cos[i])) + rb(b * static_cast<float>(sin[i])));
    x[half + i] = bf16(rb(b * static_cast<float>(cos[half + i])) +
                       rb(a * static_cast<float>(sin[half + i])));
  }
}
}  // namespace

void rope_heads_bf16(bf16* x, const bf16* cos, const bf16* sin, int64_t heads, int64_t D) {
  for (int64_t h = 0; h < heads; ++h) rope_head(x + h * D, cos, sin, D);
}

void rope_write_kv(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                   torch::Tensor v_cache, torch::Tensor slots, int64_t H, int64_t KVH) {
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 &&
                  sin.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16,
              "rope_write_kv: bfloat16");
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) % (H + 2 * KVH) == 0,
              "rope_write_kv: qkv must be a contiguous [T, (H + 2 KVH) D]");
  const int64_t T = qkv.size(0), D = qkv.size(1) / (H + 2 * KVH), row = KVH * D;
  TORCH_CHECK(D % 2 == 0 && cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * D &&
                  sin.numel() == T * D,
              "rope_write_kv: cos and sin must be contiguous [T, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(-1) == D &&
                  k_cache.size(-2) == KVH && v_cache.sizes() == k_cache.sizes(),
              "rope_write_kv: caches must be contiguous [blocks, block_size, KVH, D]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == T, "rope_write_kv: slots [T]");
  const int64_t num_slots = k_cache.numel() / row;
  slots = slots.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "rope_write_kv: slot ", sp[t], " out of range");
  bf16* xp = qkv.data_ptr<bf16>();
  const bf16* cp = cos.data_ptr<bf16>();
  const bf16* snp = sin.data_ptr<bf16>();
  bf16* kc = k_cache.data_ptr<bf16>();
  bf16* vc = v_cache.data_ptr<bf16>();
  const int64_t width = (H + 2 * KVH) * D;
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      bf16* x = xp + t * width;
      rope_heads_bf16(x, cp + t * D, snp + t * D, H + KVH, D);
      std::memcpy(kc + sp[t] * row, x + H * D, row * sizeof(bf16));
      std::memcpy(vc + sp[t] * row, x + (H + KVH) * D, row * sizeof(bf16));
    }
  });
}
