// The kernels' per-item bodies, for the fused decode (decode_layers.cpp), which runs them on
// its own threads: the same code the kernels' parallel loops run, so the same values bit for bit.
#pragma once
#include <torch/extension.h>

#include <vector>

struct ItemScratch {  // a thread's scratch for attention items, kept across items
  std::vector<float> s, inv;
  std::vector<int64_t> off;
};

// paged_decode.cpp: one (sequence, KV head) of decode attention, bf16 cache, head dim 64/128.
void paged_decode_item_bf16(const float* qb, const c10::BFloat16* kp, const c10::BFloat16* vp,
                            const int64_t* table, int64_t len, int64_t h, int64_t G, int64_t D,
                            int64_t BS, int64_t KVH, float sc, float* ob, ItemScratch& scratch);
// elementwise.cpp: rows of add_rms_norm (residual updated in place) and of silu_and_mul.
void add_rms_norm_rows_bf16(const c10::BFloat16* x, c10::BFloat16* res, const c10::BFloat16* w,
                            c10::BFloat16* out, int64_t rows, int64_t H, float eps);
void silu_mul_rows_bf16(const c10::BFloat16* x, c10::BFloat16* out, int64_t rows, int64_t I);
// rope_kv.cpp: `heads` heads of D values roped in place.
void rope_heads_bf16(c10::BFloat16* x, const c10::BFloat16* cos, const c10::BFloat16* sin,
                     int64_t heads, int64_t D);
// amx_linear.cpp: output columns [32 j, 32 j + 32) of x [M, K] @ weight.T into out (row
// stride ld), weight packed by amx_pack; `have` caches the thread's tile config ({-1, -1}
// at first; amx_release_tiles() at the end resets it).
void amx_column_block(const c10::BFloat16* x, int64_t M, int64_t K, const char* w, int64_t j,
                      c10::BFloat16* out, int64_t ld, int (&have)[2]);
void amx_release_tiles(int (&have)[2]);
