// The fused decode's ops (decode_ops.h): each item computes into its thread's scratch, then
// commits (writes the op's outputs) only if its thread still holds it (team.h).
#include "decode_ops.h"

#include <algorithm>
#include <cstring>

#include "items.h"

namespace {

struct Scratch {  // a thread's: an item computes here, then commits
  std::vector<bf16> a, b;
  std::vector<float> q, o;
  std::vector<int64_t> table;
  ItemScratch attn;
  int have[2] = {-1, -1};  // its AMX tile config
};
thread_local Scratch tls;

constexpr int64_t kRowsPerItem = 4;  // the norm's and SwiGLU's items

template <typename T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// ---- the items: inputs in op.in, outputs in op.out, sizes in op.v --------------------------
// Linear: in[0] x [M, K], in[1] tiles; out[0] y [M, N]; v: M, K, N. Item: 32 columns.
void linear_item(const Op& op, int64_t j, Commit& c) {
  const int64_t M = op.v[0], K = op.v[1], N = op.v[2];
  bf16* s = grow(tls.a, M * 32);
  amx_column_block(static_cast<const bf16*>(op.in[0]), M, K, static_cast<const char*>(op.in[1]),
                   j, s, 32, tls.have);
  if (!c.commit()) return;
  bf16* y = static_cast<bf16*>(op.out[0]);
  for (int64_t r = 0; r < M; ++r) std::memcpy(y + r * N + j * 32, s + r * 32, 64);
}

// Residual add + RMS norm: in[0] x, in[1] weight; out[0] residual (updated), out[1] normed;
// v: T, H, rows an item. f: eps.
void add_norm_item(const Op& op, int64_t i, Commit& c) {
  const int64_t T = op.v[0], H = op.v[1], r0 = i * op.v[2], rows = std::min(op.v[2], T - r0);
  bf16* res = static_cast<bf16*>(op.out[0]) + r0 * H;
  bf16* sr = grow(tls.a, rows * H);
  bf16* so = grow(tls.b, rows * H);
  std::memcpy(sr, res, rows * H * sizeof(bf16));
  add_rms_norm_rows_bf16(static_cast<const bf16*>(op.in[0]) + r0 * H, sr,
                         static_cast<const bf16*>(op.in[1]), so, rows, H, op.f);
  if (!c.commit()) return;
  std::memcpy(res, sr, rows * H * sizeof(bf16));
  std::memcpy(static_cast<bf16*>(op.out[1]) + r0 * H, so, rows * H * sizeof(bf16));
}

// SwiGLU: in[0] gate_up [T, 2I]; out[0] [T, I]; v: T, I, rows an item.
void silu_item(const Op& op, int64_t i, Commit& c) {
  const int64_t T = op.v[0], I = op.v[1], r0 = i * op.v[2], rows = std::min(op.v[2], T - r0);
  bf16* s = grow(tls.a, rows * I);
  silu_mul_rows_bf16(static_cast<const bf16*>(op.in[0]) + r0 * 2 * I, s, rows, I);
  if (!c.commit()) return;
  std::memcpy(static_cast<bf16*>(op.out[0]) + r0 * I, s, rows * I * sizeof(bf16));
}

// Rope + KV write of token t: in[0] cos [T, D], in[1] sin, in[2] slots; out[0] qkv (roped in
// place), out[1] k_cache, out[2] v_cache; v: H, KVH, D.
void rope_item(const Op& op, int64_t t, Commit& c) {
  const int64_t H = op.v[0], KVH = op.v[1], D = op.v[2], width = (H + 2 * KVH) * D;
  const int64_t row = KVH * D, slot = static_cast<const int64_t*>(op.in[2])[t];
  bf16* qkv = static_cast<bf16*>(op.out[0]) + t * width;
  bf16* s = grow(tls.a, width);
  std::memcpy(s, qkv, width * sizeof(bf16));
  rope_heads_bf16(s, static_cast<const bf16*>(op.in[0]) + t * D,
                  static_cast<const bf16*>(op.in[1]) + t * D, H + KVH, D);
  if (!c.commit()) return;
  std::memcpy(qkv, s, width * sizeof(bf16));
  std::memcpy(static_cast<bf16*>(op.out[1]) + slot * row, s + H * D, row * sizeof(bf16));
  std::memcpy(static_cast<bf16*>(op.out[2]) + slot * row, s + (H + KVH) * D, row * sizeof(bf16));
}

// Decode attention of (sequence b, KV head h): in[0] qkv, in[1] k_cache, in[2] v_cache,
// in[3] tables [B, MB], in[4] lens [B]; out[0] [B, H D]; v: H, KVH, D, BS, MB, blocks in the
// cache. f: scale. The table row and the length are clamped to the cache as they are read: a
// late thread (preempted past its step) may read a workspace the next step has rewritten, and
// it must not read outside the cache (its result is dropped; a current step's are in range).
void attn_item(const Op& op, int64_t i, Commit& c) {
  const int64_t H = op.v[0], KVH = op.v[1], D = op.v[2], BS = op.v[3], MB = op.v[4];
  const int64_t b = i / KVH, h = i % KVH, G = H / KVH, width = (H + 2 * KVH) * D;
  const int64_t len = std::clamp<int64_t>(static_cast<const int64_t*>(op.in[4])[b], 1, MB * BS);
  const int64_t* row = static_cast<const int64_t*>(op.in[3]) + b * MB;
  int64_t* table = grow(tls.table, MB);
  for (int64_t j = 0; j < MB; ++j) table[j] = std::clamp<int64_t>(row[j], 0, op.v[5] - 1);
  const bf16* q = static_cast<const bf16*>(op.in[0]) + b * width + h * G * D;
  float* qf = grow(tls.q, G * D);
  float* of = grow(tls.o, G * D);
  for (int64_t k = 0; k < G * D; ++k) qf[k] = static_cast<float>(q[k]);
  paged_decode_item_bf16(qf, static_cast<const bf16*>(op.in[1]),
                         static_cast<const bf16*>(op.in[2]), table, len, h, G, D, BS, KVH, op.f,
                         of, tls.attn);
  if (!c.commit()) return;
  bf16* out = static_cast<bf16*>(op.out[0]) + b * H * D + h * G * D;
  for (int64_t k = 0; k < G * D; ++k) out[k] = bf16(of[k]);
}

}  // namespace

void release_thread_tiles() { amx_release_tiles(tls.have); }

Op linear_op(const bf16* x, const torch::Tensor& tiles, bf16* y, int64_t M) {
  Op op;
  op.fn = linear_item;
  op.n = tiles.size(0);
  op.in[0] = x;
  op.in[1] = tiles.data_ptr<bf16>();
  op.out[0] = y;
  op.v[0] = M, op.v[1] = tiles.size(1) * 32, op.v[2] = tiles.size(0) * 32;
  return op;
}

Op add_norm_op(const bf16* x, bf16* res, const torch::Tensor& w, bf16* out, int64_t T,
               int64_t H, double eps) {
  Op op;
  op.fn = add_norm_item;
  op.v[0] = T, op.v[1] = H, op.v[2] = kRowsPerItem;
  op.n = (T + kRowsPerItem - 1) / kRowsPerItem;
  op.in[0] = x;
  op.in[1] = w.data_ptr<bf16>();
  op.out[0] = res;
  op.out[1] = out;
  op.f = static_cast<float>(eps);
  return op;
}

Op rope_op(const bf16* cos, const bf16* sin, const int64_t* slots, bf16* qkv, bf16* k_cache,
           bf16* v_cache, int64_t T, int64_t H, int64_t KVH, int64_t D) {
  Op op;
  op.fn = rope_item;
  op.n = T;
  op.in[0] = cos, op.in[1] = sin, op.in[2] = slots;
  op.out[0] = qkv, op.out[1] = k_cache, op.out[2] = v_cache;
  op.v[0] = H, op.v[1] = KVH, op.v[2] = D;
  return op;
}

Op attn_op(const bf16* qkv, const bf16* k_cache, const bf16* v_cache, const int64_t* tables,
           const int64_t* lens, bf16* out, int64_t T, int64_t H, int64_t KVH, int64_t D,
           int64_t BS, int64_t MB, int64_t blocks, double scale) {
  Op op;
  op.fn = attn_item;
  op.n = T * KVH;
  op.in[0] = qkv, op.in[1] = k_cache, op.in[2] = v_cache, op.in[3] = tables, op.in[4] = lens;
  op.out[0] = out;
  op.v[0] = H, op.v[1] = KVH, op.v[2] = D, op.v[3] = BS, op.v[4] = MB, op.v[5] = blocks;
  op.f = static_cast<float>(scale);
  return op;
}

Op silu_op(const bf16* gate_up, bf16* out, int64_t T, int64_t I) {
  Op op;
  op.fn = silu_item;
  op.v[0] = T, op.v[1] = I, op.v[2] = kRowsPerItem;
  op.n = (T + kRowsPerItem - 1) / kRowsPerItem;
  op.in[0] = gate_up;
  op.out[0] = out;
  return op;
}
