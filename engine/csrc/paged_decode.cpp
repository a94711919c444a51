// Paged decode attention on CPU (engine/cpu_attention.py builds and loads this file).
//
// For each (sequence b, KV head h), in parallel over torch's intra-op threads:
//   s[g, t] = scale * q[b, h*G + g] . K[page(t), slot(t), h]     t < context_len[b]
//   p = softmax_t(s)                                              (max-subtracted, fp32)
//   out[b, h*G + g] = sum_t p[g, t] * V[page(t), slot(t), h]
// K and V are fp32 or bf16 (widened to fp32 as they are read); all sums are fp32.
//
// Two implementations: an AVX-512 one for head dims 64 and 128 (the scores of 16 tokens
// at a time summed across lanes in one transpose, a vector exp, and the output rows of up to
// 16 / (D / 16) heads held in registers while V is walked once), and a portable one for the
// rest, or where the compiler targets no AVX-512.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "items.h"

// One K or V row as fp32: a copy for bf16 (a shift per element), the row itself for fp32.
template <int DC>
static inline const float* row_f32(const float* src, int64_t, float*) { return src; }
template <int DC>
static inline const float* row_f32(const c10::BFloat16* src, int64_t D, float* buf) {
  const int64_t n = DC ? DC : D;
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(buf);
  #pragma omp simd
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<uint32_t>(raw[d]) << 16;
  return buf;
}

// DC: the head dim when known at compile time (64, 128: loops unrolled and vectorized whole),
// 0 for any other. Tokens are walked page by page (no division per token).
template <typename T, int DC>
void paged_decode_impl(const float* qp, const T* kp, const T* vp, const int64_t* tp,
                       const int64_t* lp, float* op, int64_t B, int64_t H, int64_t Drt,
                       int64_t BS, int64_t KVH, int64_t MB, float sc) {
  const int64_t D = DC ? DC : Drt;
  const int64_t G = H / KVH, row_stride = KVH * D, page_stride = BS * KVH * D;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s, buf(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KVH, h = i % KVH, len = std::min(lp[b], MB * BS);
      s.assign(G * len, 0.f);
      const float* qb = qp + (b * H + h * G) * D;
      const int64_t* table = tp + b * MB;
      for (int64_t t0 = 0; t0 < len; t0 += BS) {  // scores: each K row read once, all G heads
        const T* page = kp + table[t0 / BS] * page_stride + h * D;
        const int64_t n = std::min(BS, len - t0);
        for (int64_t j = 0; j < n; ++j) {
          const float* kr = row_f32<DC>(page + j * row_stride, D, buf.data());
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qb + g * D;
            float acc = 0.f;
            #pragma omp simd reduction(+:acc)
            for (int64_t d = 0; d < D; ++d) acc += qg[d] * kr[d];
            s[g * len + t0 + j] = acc * sc;
          }
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
      for (int64_t t0 = 0; t0 < len; t0 += BS) {  // weighted V: each V row read once
        const T* page = vp + table[t0 / BS] * page_stride + h * D;
        const int64_t n = std::min(BS, len - t0);
        for (int64_t j = 0; j < n; ++j) {
          const float* vr = row_f32<DC>(page + j * row_stride, D, buf.data());
          for (int64_t g = 0; g < G; ++g) {
            const float w = s[g * len + t0 + j];
            float* og = ob + g * D;
            #pragma omp simd
            for (int64_t d = 0; d < D; ++d) og[d] += w * vr[d];
          }
        }
      }
    }
  });
}


#if defined(__AVX512F__)
#include "vec512.h"

// Element offsets of the K/V rows of tokens 0 .. ld-1 for KV head h (past len: the last row
// again, so tiles of 16 need no tail code; those scores are never stored).
static void row_offsets(const int64_t* table, int64_t len, int64_t ld, int64_t BS, int64_t KVH,
                        int64_t h, int64_t D, std::vector<int64_t>& off) {
  off.resize(ld);
  int64_t blk = 0, slot = 0;
  for (int64_t t = 0; t < len; ++t) {
    off[t] = ((table[blk] * BS + slot) * KVH + h) * D;
    if (++slot == BS) { slot = 0; ++blk; }
  }
  for (int64_t t = len; t < ld; ++t) off[t] = off[len - 1];
}

// Ask for a row's cache lines ahead of use: pages sit anywhere, so the hardware prefetcher
// loses the stream at every page boundary.
template <typename T, int D>
static inline void prefetch_row(const T* row) {
  constexpr int lines = (D * sizeof(T) + 63) / 64;
  for (int l = 0; l < lines; ++l) _mm_prefetch(reinterpret_cast<const char*>(row) + 64 * l, _MM_HINT_T0);
}


// scale * (q . row) for the 16 rows of a tile: 16 dot products, summed across lanes at once.
template <int NC, typename T>
static inline __m512 tile_scores(const float* q, const T* const* rows, __m512 vsc) {
  __m512 acc[16];
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // bf16 K: q (a bf16 value widened, so exact in bf16 again) times K by vdpbf16ps, 32
    // products an instruction, summed in fp32; the scale is applied to the sums.
    __m512bh qv[NC / 2];
    for (int c = 0; c < NC / 2; ++c)
      qv[c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + 32 * c + 16), _mm512_loadu_ps(q + 32 * c));
    for (int j = 0; j < 16; ++j) {
      __m512 a = _mm512_setzero_ps();
      for (int c = 0; c < NC / 2; ++c)
        a = _mm512_dpbf16_ps(a, qv[c], (__m512bh)_mm512_loadu_si512(rows[j] + 32 * c));
      acc[j] = a;
    }
    return _mm512_mul_ps(hsum16x16(acc), vsc);
  }
#endif
  __m512 qv[NC];
  for (int c = 0; c < NC; ++c) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), vsc);
  for (int j = 0; j < 16; ++j) {
    __m512 a = _mm512_mul_ps(qv[0], load16(rows[j]));
    for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(qv[c], load16(rows[j] + 16 * c), a);
    acc[j] = a;
  }
  return hsum16x16(acc);
}

// s[g, t] for every head g of the group and token t < len, 16 tokens at a time.
template <typename T, int NC>
static void scores(const float* qb, const T* kp, const int64_t* off, int64_t len, int64_t G,
                   float sc, float* s, int64_t ld) {
  constexpr int D = NC * 16;
  const __m512 vsc = _mm512_set1_ps(sc);
  const T* rows[16];
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, len - t0));
    for (int j = 0; j < 16; ++j) rows[j] = kp + off[t0 + j];
    if (t0 + 16 < len)
      for (int j = 0; j < 16; ++j) prefetch_row<T, D>(kp + off[std::min(t0 + 16 + j, len - 1)]);
    for (int64_t g = 0; g < G; ++g)
      _mm512_mask_storeu_ps(s + g * ld + t0, first(n), tile_scores<NC>(qb + g * D, rows, vsc));
  }
}

// s[g, :len] <- exp(s - max); returns 1 / sum.
static float softmax_avx512(float* sg, int64_t len) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < len; t += 16) {
    const __mmask16 k = len - t >= 16 ? 0xFFFF : first(static_cast<int>(len - t));
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, sg + t));
  }
  const __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; t += 16) {
    const __mmask16 k = len - t >= 16 ? 0xFFFF : first(static_cast<int>(len - t));
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sg + t), vm));
    sum = _mm512_mask_add_ps(sum, k, sum, e);
    _mm512_mask_storeu_ps(sg + t, k, e);
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// One (sequence, KV head) item: the G query heads `qb` [G, D] fp32 attend over `len` tokens of
// the block table `table`; their outputs go to `ob` [G, D] fp32. s, inv, off: the caller's
// scratch (kept across items).
template <typename T, int NC>
void decode_item(const float* qb, const T* kp, const T* vp, const int64_t* table, int64_t len,
                 int64_t h, int64_t G, int64_t BS, int64_t KVH, float sc, float* ob,
                 std::vector<float>& s, std::vector<float>& inv, std::vector<int64_t>& off) {
  constexpr int D = NC * 16, GB = 16 / NC;  // GB heads' output rows fit in 16 registers
  const int64_t Gp = (G + GB - 1) / GB * GB, ld = (len + 15) / 16 * 16;
  inv.resize(Gp);
  s.assign(Gp * ld, 0.f);  // rows past G stay 0: heads that add nothing
  row_offsets(table, len, ld, BS, KVH, h, D, off);
  scores<T, NC>(qb, kp, off.data(), len, G, sc, s.data(), ld);
  for (int64_t g = 0; g < G; ++g) inv[g] = softmax_avx512(s.data() + g * ld, len);
  for (int64_t g0 = 0; g0 < G; g0 += GB) {  // weighted V: V read once per GB heads
    __m512 o[GB][NC];
    for (int gg = 0; gg < GB; ++gg)
      for (int c = 0; c < NC; ++c) o[gg][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
      const T* vr = vp + off[t];
      if (t + 16 < len) prefetch_row<T, D>(vp + off[t + 16]);
      __m512 v[NC];
      for (int c = 0; c < NC; ++c) v[c] = load16(vr + 16 * c);
      for (int gg = 0; gg < GB; ++gg) {
        const __m512 w = _mm512_set1_ps(s[(g0 + gg) * ld + t]);
        for (int c = 0; c < NC; ++c) o[gg][c] = _mm512_fmadd_ps(w, v[c], o[gg][c]);
      }
    }
    for (int gg = 0; gg < GB && g0 + gg < G; ++gg) {
      float* og = ob + (g0 + gg) * D;
      const __m512 vi = _mm512_set1_ps(inv[g0 + gg]);
      for (int c = 0; c < NC; ++c) _mm512_storeu_ps(og + 16 * c, _mm512_mul_ps(o[gg][c], vi));
    }
  }
}

template <typename T, int NC>
void paged_decode_avx512(const float* qp, const T* kp, const T* vp, const int64_t* tp,
                         const int64_t* lp, float* op, int64_t B, int64_t H, int64_t BS,
                         int64_t KVH, int64_t MB, float sc) {
  constexpr int D = NC * 16;
  const int64_t G = H / KVH;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s, inv;
    std::vector<int64_t> off;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KVH, h = i % KVH, len = std::min(lp[b], MB * BS);
      const int64_t at = (b * H + h * G) * D;
      decode_item<T, NC>(qp + at, kp, vp, tp + b * MB, len, h, G, BS, KVH, sc, op + at, s, inv,
                         off);
    }
  });
}

void paged_decode_item_bf16(const float* qb, const c10::BFloat16* kp, const c10::BFloat16* vp,
                            const int64_t* table, int64_t len, int64_t h, int64_t G, int64_t D,
                            int64_t BS, int64_t KVH, float sc, float* ob, ItemScratch& scratch) {
  if (D == 64)
    return decode_item<c10::BFloat16, 4>(qb, kp, vp, table, len, h, G, BS, KVH, sc, ob,
                                         scratch.s, scratch.inv, scratch.off);
  TORCH_CHECK(D == 128, "paged_decode_item_bf16: head dim 64 or 128");
  decode_item<c10::BFloat16, 8>(qb, kp, vp, table, len, h, G, BS, KVH, sc, ob, scratch.s,
                                scratch.inv, scratch.off);
}
#else
void paged_decode_item_bf16(const float*, const c10::BFloat16*, const c10::BFloat16*,
                            const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            float, float*, ItemScratch&) {
  TORCH_CHECK(false, "paged_decode_item_bf16: built for a CPU without AVX-512");
}
#endif

template <typename T>
void paged_decode_dispatch(const float* qp, const T* kp, const T* vp, const int64_t* tp,
                           const int64_t* lp, float* op, int64_t B, int64_t H, int64_t D,
                           int64_t BS, int64_t KVH, int64_t MB, float sc) {
#if defined(__AVX512F__)
  if (D == 64) return paged_decode_avx512<T, 4>(qp, kp, vp, tp, lp, op, B, H, BS, KVH, MB, sc);
  if (D == 128) return paged_decode_avx512<T, 8>(qp, kp, vp, tp, lp, op, B, H, BS, KVH, MB, sc);
#endif
  if (D == 64) return paged_decode_impl<T, 64>(qp, kp, vp, tp, lp, op, B, H, D, BS, KVH, MB, sc);
  paged_decode_impl<T, 0>(qp, kp, vp, tp, lp, op, B, H, D, BS, KVH, MB, sc);
}

// q [B, H, D] (any strides, fp32 or bf16) as a contiguous fp32 buffer, and a tensor's values
// as int64: plain loops, where torch's .to() would be three dispatched ops a layer.
template <typename T>
static void widen(const T* src, const at::IntArrayRef& st, int64_t B, int64_t H, int64_t D,
                  float* dst) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d)
        dst[(b * H + h) * D + d] = static_cast<float>(src[b * st[0] + h * st[1] + d * st[2]]);
}

static std::vector<int64_t> as_int64(const torch::Tensor& t) {
  auto c = t.contiguous();
  std::vector<int64_t> v(c.numel());
  if (c.scalar_type() == torch::kInt) {
    const int32_t* p = c.data_ptr<int32_t>();
    std::copy(p, p + v.size(), v.begin());
  } else {
    c = c.to(torch::kLong);
    std::copy(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + v.size(), v.begin());
  }
  return v;
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  // q: [B, H, D]; caches: [NB, BS, KVH, D] fp32 or bf16; tables: [B, MB]; lens: [B]
  // Scores, softmax and sums run in fp32; the result has q's dtype.
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == k_cache.scalar_type(),
              "paged_decode: q is [B, H, D] in the cache's dtype");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2), MB = block_tables.size(1);
  auto tables = block_tables.to(torch::kLong).contiguous();  // int64 already: no copy
  const std::vector<int64_t> lens = as_int64(context_lens);
  const bool bf16 = k_cache.scalar_type() == torch::kBFloat16;
  std::vector<float> qf(B * H * D), of(bf16 ? B * H * D : 0);  // of: fp32 sums of a bf16 out
  auto out = torch::empty({B, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const float sc = static_cast<float>(scale);
  if (bf16) {
    widen(q.data_ptr<c10::BFloat16>(), q.strides(), B, H, D, qf.data());
    paged_decode_dispatch(qf.data(), k_cache.data_ptr<c10::BFloat16>(),
                          v_cache.data_ptr<c10::BFloat16>(), tables.data_ptr<int64_t>(),
                          lens.data(), of.data(), B, H, D, BS, KVH, MB, sc);
    c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < B * H * D; ++i) o[i] = c10::BFloat16(of[i]);
  } else {
    widen(q.data_ptr<float>(), q.strides(), B, H, D, qf.data());
    paged_decode_dispatch(qf.data(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                          tables.data_ptr<int64_t>(), lens.data(), out.data_ptr<float>(), B, H,
                          D, BS, KVH, MB, sc);
  }
  return out;
}
