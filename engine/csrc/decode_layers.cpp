// A decode step's decoder layers in one call (engine/fused_decode.py): bf16 on a CPU with AMX.
//
// The same kernel bodies (csrc/items.h), in the same order, as engine/model.py's layers run
// one Python call at a time, so the result is the same bit for bit. What goes: the Python and
// op dispatch around ~10 calls a layer (~6 ms a step over 30 layers), and OpenMP's barriers:
// every op runs on a Team (team.h), whose caller takes over the items of a thread the OS has
// preempted instead of waiting for it.
//
//   weights: 6 per layer (input norm, qkv tiles, o tiles, post-attention norm, gate_up tiles,
//            down tiles), then the final norm; tiles as engine/linear.amx_pack makes them.
//   layer:   h = norm(x + residual) (layer 0: norm(x)); qkv = h Wqkv; rope q, k and write k, v
//            to their slots; a = attention(q) over the pages; h = a Wo;
//            h = norm(h + residual); x = silu_and_mul(h Wgate_up) Wdown
//   returns  norm(x + residual) with the final norm: the hidden states for the logits.
//
// Every buffer a step's items read or write lives in a workspace that is never freed (a late,
// preempted helper may still read one after the op it ran is over; it never writes it).
#include <ATen/Parallel.h>

#include <cstring>

#include "items.h"
#include "kernels.h"
#include "team.h"

namespace {
using bf16 = c10::BFloat16;

struct Scratch {  // a thread's: an item computes here, then commits
  std::vector<bf16> a, b;
  std::vector<float> q, o;
  ItemScratch attn;
  int have[2] = {-1, -1};  // its AMX tile config
};
thread_local Scratch tls;

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
// in[3] tables [B, MB], in[4] lens [B]; out[0] [B, H D]; v: H, KVH, D, BS, MB. f: scale.
void attn_item(const Op& op, int64_t i, Commit& c) {
  const int64_t H = op.v[0], KVH = op.v[1], D = op.v[2], BS = op.v[3], MB = op.v[4];
  const int64_t b = i / KVH, h = i % KVH, G = H / KVH, width = (H + 2 * KVH) * D;
  const int64_t len = std::min(static_cast<const int64_t*>(op.in[4])[b], MB * BS);
  const bf16* q = static_cast<const bf16*>(op.in[0]) + b * width + h * G * D;
  float* qf = grow(tls.q, G * D);
  float* of = grow(tls.o, G * D);
  for (int64_t k = 0; k < G * D; ++k) qf[k] = static_cast<float>(q[k]);
  paged_decode_item_bf16(qf, static_cast<const bf16*>(op.in[1]),
                         static_cast<const bf16*>(op.in[2]),
                         static_cast<const int64_t*>(op.in[3]) + b * MB, len, h, G, D, BS, KVH,
                         op.f, of, tls.attn);
  if (!c.commit()) return;
  bf16* out = static_cast<bf16*>(op.out[0]) + b * H * D + h * G * D;
  for (int64_t k = 0; k < G * D; ++k) out[k] = bf16(of[k]);
}

// ---- the step's buffers -------------------------------------------------------------------
struct Workspace {
  std::vector<std::unique_ptr<std::vector<char>>> keep;  // outgrown buffers, never freed
  std::vector<char>* buf = nullptr;
  char* take(size_t& at, size_t bytes) {
    char* p = buf->data() + at;
    at += (bytes + 63) / 64 * 64;
    return p;
  }
  void reserve(size_t bytes) {
    if (buf != nullptr && buf->size() >= bytes) return;
    keep.push_back(std::make_unique<std::vector<char>>(bytes * 2 + 4096));
    buf = keep.back().get();
  }
};
Workspace ws;

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
  op.v[0] = T, op.v[1] = H, op.v[2] = 4;
  op.n = (T + 3) / 4;
  op.in[0] = x;
  op.in[1] = w.data_ptr<bf16>();
  op.out[0] = res;
  op.out[1] = out;
  op.f = static_cast<float>(eps);
  return op;
}

void check_tiles(const torch::Tensor& t, int64_t K) {
  TORCH_CHECK(t.dim() == 6 && t.scalar_type() == at::kBFloat16 && t.is_contiguous() &&
                  t.size(1) * 32 == K,
              "decode_layers: weight tiles from amx_pack, of ", K, " inputs");
}
}  // namespace

void release_thread_tiles() { amx_release_tiles(tls.have); }

torch::Tensor decode_layers(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                            torch::Tensor kv_cache, torch::Tensor slots,
                            torch::Tensor block_tables, torch::Tensor context_lens,
                            std::vector<torch::Tensor> weights, int64_t H, int64_t KVH,
                            double eps, double scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "decode_layers: x is [B, hidden]");
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(1) == 2 && kv_cache.is_contiguous() &&
                  kv_cache.scalar_type() == at::kBFloat16 && kv_cache.size(4) == KVH,
              "decode_layers: kv_cache is a contiguous bf16 [layers, 2, blocks, block_size, KVH, D]");
  const int64_t L = kv_cache.size(0), T = x.size(0), hid = x.size(1), D = kv_cache.size(5);
  const int64_t BS = kv_cache.size(3), num_slots = kv_cache.size(2) * BS;
  TORCH_CHECK(D == 64 || D == 128, "decode_layers: head dim 64 or 128");
  TORCH_CHECK(H % KVH == 0 && static_cast<int64_t>(weights.size()) == 6 * L + 1,
              "decode_layers: 6 weights a layer and the final norm");
  const int64_t qkvw = (H + 2 * KVH) * D, I = weights[4].size(0) * 16;
  for (int64_t i = 0; i < L; ++i) {
    check_tiles(weights[6 * i + 1], hid);
    check_tiles(weights[6 * i + 2], H * D);
    check_tiles(weights[6 * i + 4], hid);
    check_tiles(weights[6 * i + 5], I);
    TORCH_CHECK(weights[6 * i + 1].size(0) * 32 == qkvw && weights[6 * i + 2].size(0) * 32 == hid &&
                    weights[6 * i + 4].size(0) * 32 == 2 * I &&
                    weights[6 * i + 5].size(0) * 32 == hid,
                "decode_layers: layer ", i, "'s weights do not fit the model's sizes");
  }
  cos = cos.contiguous();
  sin = sin.contiguous();
  TORCH_CHECK(cos.numel() == T * D && sin.numel() == T * D && cos.scalar_type() == at::kBFloat16,
              "decode_layers: cos and sin are bf16 [B, D]");
  auto sl = slots.to(torch::kLong).contiguous();
  auto tables = block_tables.to(torch::kLong).contiguous();
  auto lens = context_lens.to(torch::kLong).contiguous();
  TORCH_CHECK(sl.numel() == T && tables.dim() == 2 && tables.size(0) == T && lens.numel() == T,
              "decode_layers: one slot, block table and length per sequence");
  const int64_t MB = tables.size(1);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = sl.data_ptr<int64_t>()[t];
    TORCH_CHECK(s >= 0 && s < num_slots, "decode_layers: slot ", s, " out of range");
  }
  // the step's buffers, in the workspace (inputs copied in: items may outlive the tensors)
  const size_t e = sizeof(bf16), n64 = sizeof(int64_t);
  const size_t sizes[] = {T * hid * e, T * hid * e, T * hid * e, T * qkvw * e, T * H * D * e,
                          T * hid * e, T * 2 * I * e, T * I * e, T * hid * e, T * D * e,
                          T * D * e, T * n64, T * MB * n64, T * n64};
  size_t total = 0;
  for (size_t s : sizes) total += (s + 63) / 64 * 64;
  ws.reserve(total);
  size_t at = 0;
  auto* xb = reinterpret_cast<bf16*>(ws.take(at, sizes[0]));
  auto* res = reinterpret_cast<bf16*>(ws.take(at, sizes[1]));
  auto* h = reinterpret_cast<bf16*>(ws.take(at, sizes[2]));
  auto* qkv = reinterpret_cast<bf16*>(ws.take(at, sizes[3]));
  auto* attn = reinterpret_cast<bf16*>(ws.take(at, sizes[4]));
  auto* o = reinterpret_cast<bf16*>(ws.take(at, sizes[5]));
  auto* gu = reinterpret_cast<bf16*>(ws.take(at, sizes[6]));
  auto* act = reinterpret_cast<bf16*>(ws.take(at, sizes[7]));
  auto* fin = reinterpret_cast<bf16*>(ws.take(at, sizes[8]));
  auto* cs = reinterpret_cast<bf16*>(ws.take(at, sizes[9]));
  auto* sn = reinterpret_cast<bf16*>(ws.take(at, sizes[10]));
  auto* slp = reinterpret_cast<int64_t*>(ws.take(at, sizes[11]));
  auto* tbp = reinterpret_cast<int64_t*>(ws.take(at, sizes[12]));
  auto* lnp = reinterpret_cast<int64_t*>(ws.take(at, sizes[13]));
  std::memcpy(cs, cos.data_ptr<bf16>(), sizes[9]);
  std::memcpy(sn, sin.data_ptr<bf16>(), sizes[10]);
  std::memcpy(slp, sl.data_ptr<int64_t>(), sizes[11]);
  std::memcpy(tbp, tables.data_ptr<int64_t>(), sizes[12]);
  std::memcpy(lnp, lens.data_ptr<int64_t>(), sizes[13]);
  // layer 0's norm: HF's RMSNorm in bf16 (model.py RMSNorm.forward), torch's ops
  x = x.contiguous();
  std::memcpy(res, x.data_ptr<bf16>(), sizes[1]);
  auto h0 = (weights[0] * at::rms_norm(x, {hid}, c10::nullopt, eps)).contiguous();
  std::memcpy(h, h0.data_ptr<bf16>(), sizes[2]);

  std::vector<Op> ops;
  ops.reserve(9 * L + 1);
  bf16* kv = kv_cache.data_ptr<bf16>();
  const int64_t layer_stride = kv_cache.stride(0), kv_stride = kv_cache.stride(1);
  for (int64_t i = 0; i < L; ++i) {
    const torch::Tensor* w = weights.data() + 6 * i;
    if (i > 0) ops.push_back(add_norm_op(xb, res, w[0], h, T, hid, eps));
    ops.push_back(linear_op(h, w[1], qkv, T));
    Op rope;
    rope.fn = rope_item;
    rope.n = T;
    rope.in[0] = cs, rope.in[1] = sn, rope.in[2] = slp;
    rope.out[0] = qkv, rope.out[1] = kv + i * layer_stride, rope.out[2] = kv + i * layer_stride + kv_stride;
    rope.v[0] = H, rope.v[1] = KVH, rope.v[2] = D;
    ops.push_back(rope);
    Op at_op;
    at_op.fn = attn_item;
    at_op.n = T * KVH;
    at_op.in[0] = qkv, at_op.in[1] = rope.out[1], at_op.in[2] = rope.out[2];
    at_op.in[3] = tbp, at_op.in[4] = lnp;
    at_op.out[0] = attn;
    at_op.v[0] = H, at_op.v[1] = KVH, at_op.v[2] = D, at_op.v[3] = BS, at_op.v[4] = MB;
    at_op.f = static_cast<float>(scale);
    ops.push_back(at_op);
    ops.push_back(linear_op(attn, w[2], o, T));
    ops.push_back(add_norm_op(o, res, w[3], h, T, hid, eps));
    ops.push_back(linear_op(h, w[4], gu, T));
    Op silu;
    silu.fn = silu_item;
    silu.v[0] = T, silu.v[1] = I, silu.v[2] = 4;
    silu.n = (T + 3) / 4;
    silu.in[0] = gu;
    silu.out[0] = act;
    ops.push_back(silu);
    ops.push_back(linear_op(act, w[5], xb, T));
  }
  ops.push_back(add_norm_op(xb, res, weights.back(), fin, T, hid, eps));
  team_for(at::get_num_threads()).run(ops);
  release_thread_tiles();
  auto out = torch::empty({T, hid}, x.options());
  std::memcpy(out.data_ptr<bf16>(), fin, sizes[8]);
  return out;
}
