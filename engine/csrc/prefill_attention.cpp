// Causal attention of a prefill step's chunks on AMX tiles, bf16 (engine/cpu_attention.py calls
// it for every chunk of a step, whole prompts and chunks after a cached prefix alike, of any
// lengths, in one call a layer). The chunks' K and V are read from the paged cache, where
// the layer has just written them.
//
// torch's fused CPU kernel runs this at 0.2-0.5 TFLOP/s here (16 prompts of 128 tokens to one
// of 2,048, head dim 64). This one is flash attention on AMX:
//
//   1. each (chunk, KV head)'s context (cached tokens and its own), packed once from the
//      pages into AMX B tiles (VNNI pairs): K as 16 keys x 32 dims, V as 32 keys x 16 dims,
//      zero past the context's end;
//   2. each (chunk, query head, block of 32 query rows), on the thread with the least work
//      so far (a block's cost is the number of key blocks it reads, causal):
//        for each block of up to 128 keys up to the block's last position:
//          S = Q K^T          4 accumulator tiles a 32 keys (2 row tiles x 2 key tiles), fp32
//          online softmax     scale, causal mask, running max and sum (base 2)
//          O = O a + P V      P rounded to bf16 (as torch's kernel rounds it), fp32 O
//        out = O / sum, rounded once to bf16.
// Scores, softmax and sums are fp32; q and out are bf16 rows of any row stride (q is a view
// into the fused qkv projection).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

bool amx_available();  // amx_linear.cpp

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "amx_tiles.h"

#include "vec512.h"

namespace {
using bf16 = c10::BFloat16;
constexpr int kBlock = 32;  // query rows, and keys, per block
constexpr int kTile = 512;  // bf16 elements in one 16-row x 64-byte tile
constexpr int kKeys = 128;  // keys per softmax step (4 blocks of 32)

// Every tile 16 rows of 64 bytes. 0-3: accumulators; 4, 5: A (Q or P rows 0-15, 16-31);
// 6, 7: B (K or V).
void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  load_tile_config(cfg);
}

struct Rows {  // a [T, heads, D] bf16 tensor's data: row stride in elements, head stride D
  bf16* data;
  int64_t stride;
};

// One KV head's rows of one chunk's context in the paged cache [blocks, BS, KVH, D]: key t
// sits in block table[t / BS] at slot t % BS.
struct Pages {
  const bf16* cache;
  const int64_t* table;
  int64_t BS, KVH, h, D;
  const bf16* row(int64_t t) const { return cache + ((table[t / BS] * BS + t % BS) * KVH + h) * D; }
};

// K of one (chunk, KV head): tile (16-key block, 32-dim chunk c) row r holds dims 2r, 2r+1 of
// its 16 keys (as uint32 pairs: a 16 x 16 transpose).
template <int D>
void pack_k(const Pages& k, int64_t len, int64_t blocks, bf16* dst) {
  constexpr int DCH = D / 32;
  for (int64_t kb = 0; kb < 2 * blocks; ++kb)
    for (int c = 0; c < DCH; ++c) {
      auto* tile = reinterpret_cast<uint32_t*>(dst + (kb * DCH + c) * kTile);
      for (int n = 0; n < 16; ++n) {
        const int64_t key = kb * 16 + n;
        if (key >= len) {
          for (int r = 0; r < 16; ++r) tile[r * 16 + n] = 0u;
          continue;
        }
        const auto* src = reinterpret_cast<const uint32_t*>(k.row(key) + c * 32);
        for (int r = 0; r < 16; ++r) tile[r * 16 + n] = src[r];
      }
    }
}

// V of one (chunk, KV head): tile (32-key block, 16-dim column ct) row r holds keys 2r, 2r+1
// of its 16 dims, interleaved.
template <int D>
void pack_v(const Pages& v, int64_t len, int64_t blocks, bf16* dst) {
  constexpr int NC = D / 16;
  const bf16 zero(0.f);
  for (int64_t kb = 0; kb < blocks; ++kb)
    for (int ct = 0; ct < NC; ++ct) {
      bf16* tile = dst + (kb * NC + ct) * kTile;
      for (int r = 0; r < 16; ++r)
        for (int e = 0; e < 2; ++e) {
          const int64_t key = kb * kBlock + 2 * r + e;
          if (key >= len) {
            for (int n = 0; n < 16; ++n) tile[r * 32 + n * 2 + e] = zero;
            continue;
          }
          const bf16* src = v.row(key) + ct * 16;
          for (int n = 0; n < 16; ++n) tile[r * 32 + n * 2 + e] = src[n];
        }
    }
}

template <int D>
struct Scratch {
  alignas(64) bf16 q[kBlock * D];
  alignas(64) float s[kBlock * kKeys];
  alignas(64) bf16 p[kBlock * kKeys];
  alignas(64) float pv[kBlock * D];
  alignas(64) float o[kBlock * D];
  alignas(64) float m[kBlock];
  alignas(64) float l[kBlock];
  alignas(64) float alpha[kBlock];
};

// s[:, 0:width] = Q K^T for keys k0 .. k0 + width - 1 (fp32, rows of kKeys).
template <int D>
void block_scores(const bf16* q, const bf16* kp, int64_t k0, int width, float* s) {
  constexpr int DCH = D / 32;
  for (int sub = 0; sub < width / kBlock; ++sub) {
    const int64_t kb = k0 / kBlock + sub;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int c = 0; c < DCH; ++c) {
      _tile_loadd(4, q + c * 32, D * 2);
      _tile_loadd(5, q + 16 * D + c * 32, D * 2);
      _tile_loadd(6, kp + (2 * kb * DCH + c) * kTile, 64);
      _tile_loadd(7, kp + ((2 * kb + 1) * DCH + c) * kTile, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    float* at = s + sub * kBlock;
    _tile_stored(0, at, kKeys * 4);
    _tile_stored(1, at + 16, kKeys * 4);
    _tile_stored(2, at + 16 * kKeys, kKeys * 4);
    _tile_stored(3, at + 16 * kKeys + 16, kKeys * 4);
  }
}

// The lanes of keys k .. k + 15 among the first `seen` keys of a row (causal).
static inline __mmask16 seen_lanes(int64_t seen, int64_t k) {
  const int64_t n = seen - k;
  return n >= 16 ? 0xFFFF : (n <= 0 ? 0 : first(static_cast<int>(n)));
}

// The online softmax over keys k0 .. k0 + width - 1 for query rows q0 .. q0 + 31: the
// running max m (of raw scores) and sum l, alpha = e^(scale (m_old - m_new)) for the rows
// of o, and p = e^(scale (s - m)) as bf16 (in base 2: scale log2(e) folded in).
template <int D>
void softmax_rows(Scratch<D>& w, float scale, int64_t q0, int64_t k0, int width) {
  const float sc2 = scale * 1.44269504088896341f;
  const __m512 ninf = _mm512_set1_ps(-INFINITY), vsc = _mm512_set1_ps(sc2);
  alignas(64) float mold[kBlock];
  for (int i = 0; i < kBlock; ++i) {
    const int64_t seen = std::min<int64_t>(width, q0 + i - k0 + 1);  // >= 1
    __m512 mx = ninf;
    for (int64_t c = 0; c * 16 < seen; ++c)
      mx = _mm512_mask_max_ps(mx, seen_lanes(seen, 16 * c), mx,
                              _mm512_load_ps(w.s + i * kKeys + 16 * c));
    mold[i] = w.m[i];
    w.m[i] = std::max(w.m[i], _mm512_reduce_max_ps(mx));
  }
  for (int i = 0; i < kBlock; i += 16) {  // 2^-126 ~ 0 where m_old = -inf (o and l are 0)
    const __m512 d = _mm512_sub_ps(_mm512_load_ps(mold + i), _mm512_load_ps(w.m + i));
    _mm512_store_ps(w.alpha + i, exp2_512(_mm512_mul_ps(d, vsc)));
  }
  for (int i = 0; i < kBlock; ++i) {
    const int64_t seen = std::min<int64_t>(width, q0 + i - k0 + 1);
    const __m512 vm = _mm512_set1_ps(w.m[i] * sc2);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < width / 16; c += 2) {
      const float* s = w.s + i * kKeys + 16 * c;
      __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
      if (16 * c < seen) {
        p0 = _mm512_maskz_mov_ps(seen_lanes(seen, 16 * c),
                                 exp2_512(_mm512_fmsub_ps(_mm512_load_ps(s), vsc, vm)));
        if (16 * c + 16 < seen)
          p1 = _mm512_maskz_mov_ps(seen_lanes(seen, 16 * c + 16),
                                   exp2_512(_mm512_fmsub_ps(_mm512_load_ps(s + 16), vsc, vm)));
        sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
      }
      _mm512_store_si512(w.p + i * kKeys + 16 * c, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    }
    w.l[i] = w.l[i] * w.alpha[i] + _mm512_reduce_add_ps(sum);
  }
}

// o = o * alpha + P V for keys k0 .. k0 + width - 1.
template <int D>
void block_values(Scratch<D>& w, const bf16* vp, int64_t k0, int width) {
  constexpr int NC = D / 16;
  for (int ct = 0; ct < NC; ++ct) {
    _tile_zero(0);
    _tile_zero(1);
    for (int sub = 0; sub < width / kBlock; ++sub) {
      _tile_loadd(4, w.p + sub * kBlock, kKeys * 2);
      _tile_loadd(5, w.p + 16 * kKeys + sub * kBlock, kKeys * 2);
      _tile_loadd(6, vp + ((k0 / kBlock + sub) * NC + ct) * kTile, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
    }
    _tile_stored(0, w.pv + ct * 16, D * 4);
    _tile_stored(1, w.pv + 16 * D + ct * 16, D * 4);
  }
  for (int i = 0; i < kBlock; ++i) {
    const __m512 a = _mm512_set1_ps(w.alpha[i]);
    for (int c = 0; c < NC; ++c) {
      float* o = w.o + i * D + 16 * c;
      _mm512_store_ps(o, _mm512_fmadd_ps(_mm512_load_ps(o), a, _mm512_load_ps(w.pv + i * D + 16 * c)));
    }
  }
}

struct Item {
  int64_t chunk, head, block, cost;
};

struct Job {
  Rows q, out;
  const bf16 *kc, *vc;  // the paged caches, [blocks, BS, KVH, D]
  const int64_t *starts, *lens, *ctx;  // a chunk's rows, and its context (cached + own)
  std::vector<const int64_t*> tables;  // a chunk's block table
  int64_t BS, H, KVH;
  float scale;
};

int64_t blocks_of(int64_t len) { return (len + kBlock - 1) / kBlock; }

// Every (chunk, KV head)'s packed K and V, one after another in one buffer each.
template <int D>
struct Packed {
  torch::Tensor buffer;  // K then V
  std::vector<int64_t> chunk_at;  // where a chunk's KV heads start
  const Job& job;

  Packed(const Job& j, int64_t chunks) : chunk_at(chunks + 1, 0), job(j) {
    for (int64_t c = 0; c < chunks; ++c)
      chunk_at[c + 1] = chunk_at[c] + job.KVH * blocks_of(job.ctx[c]) * kBlock * D;
    buffer = torch::empty({2 * chunk_at[chunks]}, torch::kBFloat16);
  }
  int64_t at(int64_t c, int64_t h) const {
    return chunk_at[c] + h * blocks_of(job.ctx[c]) * kBlock * D;
  }
  bf16* k(int64_t c, int64_t h) { return buffer.data_ptr<bf16>() + at(c, h); }
  bf16* v(int64_t c, int64_t h) { return buffer.data_ptr<bf16>() + chunk_at.back() + at(c, h); }
};

// One block of 32 query rows of one head of one chunk, written to out. Row i is at position
// pos0 + i of its sequence and sees keys 0 .. pos0 + i.
template <int D>
void query_block(const Job& job, Packed<D>& packed, const Item& it, Scratch<D>& w) {
  const int64_t start = job.starts[it.chunk], len = job.lens[it.chunk];
  const int64_t kvh = it.head / (job.H / job.KVH), q0 = it.block * kBlock;
  const int64_t rows = std::min<int64_t>(kBlock, len - q0), ctx = job.ctx[it.chunk];
  const int64_t pos0 = ctx - len + q0;
  // keys up to the block's last row, in whole 32-key blocks (past ctx: zeros, masked)
  const int64_t kend = std::min(blocks_of(pos0 + kBlock), blocks_of(ctx)) * kBlock;
  const bf16* kp = packed.k(it.chunk, kvh);
  const bf16* vp = packed.v(it.chunk, kvh);
  for (int64_t i = 0; i < kBlock; ++i) {
    bf16* dst = w.q + i * D;
    if (i < rows)
      std::memcpy(dst, job.q.data + (start + q0 + i) * job.q.stride + it.head * D, D * 2);
    else
      std::memset(dst, 0, D * 2);
  }
  std::fill(w.m, w.m + kBlock, -INFINITY);
  std::fill(w.l, w.l + kBlock, 0.f);
  std::fill(w.o, w.o + kBlock * D, 0.f);
  for (int64_t k0 = 0; k0 < kend; k0 += kKeys) {
    const int width = static_cast<int>(std::min<int64_t>(kKeys, kend - k0));
    block_scores<D>(w.q, kp, k0, width, w.s);
    softmax_rows<D>(w, job.scale, pos0, k0, width);
    block_values<D>(w, vp, k0, width);
  }
  for (int64_t i = 0; i < rows; ++i) {
    bf16* dst = job.out.data + (start + q0 + i) * job.out.stride + it.head * D;
    const __m512 inv = _mm512_set1_ps(1.f / w.l[i]);
    for (int c = 0; c < D / 16; ++c) store16(dst + 16 * c, _mm512_mul_ps(load16(w.o + i * D + 16 * c), inv));
  }
}

// The blocks of every chunk and head, dealt to `threads` lists, longest first, each to the
// list with the least work so far.
std::vector<std::vector<Item>> deal(const Job& job, int64_t chunks, int threads) {
  std::vector<Item> items;
  for (int64_t p = 0; p < chunks; ++p)
    for (int64_t h = 0; h < job.H; ++h)
      for (int64_t b = 0; b < blocks_of(job.lens[p]); ++b)  // cost: the key blocks it reads
        items.push_back({p, h, b, (job.ctx[p] - job.lens[p]) / kBlock + b + 1});
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  std::vector<std::vector<Item>> lists(threads);
  std::vector<int64_t> load(threads, 0);
  for (const Item& it : items) {
    const int t = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    lists[t].push_back(it);
    load[t] += it.cost;
  }
  return lists;
}

template <int D>
void run(const Job& job, int64_t chunks) {
  Packed<D> packed(job, chunks);
  at::parallel_for(0, chunks * job.KVH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = i / job.KVH, h = i % job.KVH, blocks = blocks_of(job.ctx[p]);
      pack_k<D>({job.kc, job.tables[p], job.BS, job.KVH, h, D}, job.ctx[p], blocks, packed.k(p, h));
      pack_v<D>({job.vc, job.tables[p], job.BS, job.KVH, h, D}, job.ctx[p], blocks, packed.v(p, h));
    }
  });
  const int threads = std::max(1, at::get_num_threads());
  const auto lists = deal(job, chunks, threads);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    auto w = std::make_unique<Scratch<D>>();
    configure();
    for (int64_t t = begin; t < end; ++t)
      for (const Item& it : lists[t]) query_block<D>(job, packed, it, *w);
    _tile_release();
  });
}

Rows rows_of(const torch::Tensor& t, int64_t heads, int64_t D, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.scalar_type() == at::kBFloat16 && t.size(1) == heads &&
                  t.size(2) == D && t.stride(2) == 1 && t.stride(1) == D,
              "prefill_attention: ", name, " must be [T, heads, D] bf16 with whole rows");
  return {t.data_ptr<bf16>(), t.stride(0)};
}
}  // namespace

void prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor out, std::vector<int64_t> starts, std::vector<int64_t> lens,
                       std::vector<int64_t> ctx, std::vector<torch::Tensor> tables,
                       double scale) {
  TORCH_CHECK(amx_available(), "prefill_attention: the kernel did not get AMX from the OS");
  const size_t n = lens.size();
  TORCH_CHECK(starts.size() == n && ctx.size() == n && tables.size() == n,
              "prefill_attention: a start, a length, a context and a block table per chunk");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(D == 64 || D == 128, "prefill_attention: head dim 64 or 128");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16 &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(3) == D,
              "prefill_attention: caches are contiguous [blocks, block_size, KVH, D] bf16");
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2), NB = k_cache.size(0);
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "prefill_attention: query heads a multiple of KV heads");
  TORCH_CHECK(out.size(0) == T, "prefill_attention: q and out have the same rows");
  std::vector<const int64_t*> table_ptrs(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(lens[i] > 0 && starts[i] >= 0 && starts[i] + lens[i] <= T && ctx[i] >= lens[i],
                "prefill_attention: chunk ", i, " lies outside the rows or its context");
    TORCH_CHECK(tables[i].scalar_type() == torch::kLong && tables[i].is_contiguous() &&
                    tables[i].numel() * BS >= ctx[i],
                "prefill_attention: chunk ", i, "'s block table is int64 and covers its context");
    table_ptrs[i] = tables[i].data_ptr<int64_t>();
    for (int64_t b = 0; b < (ctx[i] + BS - 1) / BS; ++b)
      TORCH_CHECK(table_ptrs[i][b] >= 0 && table_ptrs[i][b] < NB,
                  "prefill_attention: chunk ", i, " names a block outside the cache");
  }
  Job job{rows_of(q, H, D, "q"), rows_of(out, H, D, "out"), k_cache.data_ptr<bf16>(),
          v_cache.data_ptr<bf16>(), starts.data(), lens.data(), ctx.data(), table_ptrs,
          BS, H, KVH, static_cast<float>(scale)};
  const auto chunks = static_cast<int64_t>(n);
  if (D == 64)
    run<64>(job, chunks);
  else
    run<128>(job, chunks);
}

#else  // no AMX on the CPU this was built for: engine/cpu_attention.py keeps torch's SDPA

void prefill_attention(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                       std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                       std::vector<torch::Tensor>, double) {
  TORCH_CHECK(false, "prefill_attention: built for a CPU without AMX");
}

#endif
