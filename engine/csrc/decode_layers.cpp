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
#include <ATen/Parallel.h>

#include <cstring>
#include <mutex>

#include "decode_ops.h"
#include "kernels.h"

namespace {
struct Dims {  // the step's and the model's sizes
  int64_t L, T, hid, H, KVH, D, BS, MB, I, slots;
  int64_t qkvw() const { return (H + 2 * KVH) * D; }
};

// The step's buffers, in a workspace that only grows: a buffer it outgrows is kept, not freed,
// since a late helper may still read it (it never writes it: its commit fails).
struct Buffers {
  bf16 *xb, *res, *h, *qkv, *attn, *o, *gu, *act, *fin, *cos, *sin;
  int64_t *slots, *tables, *lens;
};

Buffers layout(const Dims& d) {
  static std::vector<std::unique_ptr<std::vector<char>>> kept;
  const int64_t T = d.T;
  const int64_t bf[] = {T * d.hid, T * d.hid, T * d.hid, T * d.qkvw(), T * d.H * d.D, T * d.hid,
                        T * 2 * d.I, T * d.I, T * d.hid, T * d.D, T * d.D};
  const int64_t i64[] = {T, T * d.MB, T};
  size_t total = 0;
  for (int64_t n : bf) total += (n * sizeof(bf16) + 63) / 64 * 64;
  for (int64_t n : i64) total += (n * sizeof(int64_t) + 63) / 64 * 64;
  if (kept.empty() || kept.back()->size() < total)
    kept.push_back(std::make_unique<std::vector<char>>(total * 2 + 4096));
  char* p = kept.back()->data();
  auto take = [&p](int64_t n, size_t e) {
    char* at = p;
    p += (n * e + 63) / 64 * 64;
    return at;
  };
  Buffers b;
  bf16** bufs[] = {&b.xb, &b.res, &b.h, &b.qkv, &b.attn, &b.o, &b.gu, &b.act, &b.fin, &b.cos,
                   &b.sin};
  for (int k = 0; k < 11; ++k) *bufs[k] = reinterpret_cast<bf16*>(take(bf[k], sizeof(bf16)));
  b.slots = reinterpret_cast<int64_t*>(take(i64[0], sizeof(int64_t)));
  b.tables = reinterpret_cast<int64_t*>(take(i64[1], sizeof(int64_t)));
  b.lens = reinterpret_cast<int64_t*>(take(i64[2], sizeof(int64_t)));
  return b;
}

void check_tiles(const torch::Tensor& t, int64_t K, int64_t N, int64_t layer) {
  TORCH_CHECK(t.dim() == 6 && t.scalar_type() == at::kBFloat16 && t.is_contiguous() &&
                  t.size(1) * 32 == K && t.size(0) * 32 == N,
              "decode_layers: layer ", layer, ": weight tiles from amx_pack of [", N, ", ", K,
              "] expected");
}

Dims check_model(const torch::Tensor& x, const torch::Tensor& kv_cache,
                 const std::vector<torch::Tensor>& weights, int64_t H, int64_t KVH) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "decode_layers: x is [B, hidden]");
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(1) == 2 && kv_cache.is_contiguous() &&
                  kv_cache.scalar_type() == at::kBFloat16 && kv_cache.size(4) == KVH,
              "decode_layers: kv_cache is a contiguous bf16 [layers, 2, blocks, block_size, KVH, D]");
  Dims d{};
  d.L = kv_cache.size(0), d.T = x.size(0), d.hid = x.size(1), d.H = H, d.KVH = KVH;
  d.D = kv_cache.size(5), d.BS = kv_cache.size(3), d.slots = kv_cache.size(2) * d.BS;
  TORCH_CHECK(d.D == 64 || d.D == 128, "decode_layers: head dim 64 or 128");
  TORCH_CHECK(H % KVH == 0 && static_cast<int64_t>(weights.size()) == 6 * d.L + 1,
              "decode_layers: 6 weights a layer and the final norm");
  d.I = weights[4].size(0) * 16;
  for (int64_t i = 0; i < d.L; ++i) {
    check_tiles(weights[6 * i + 1], d.hid, d.qkvw(), i);
    check_tiles(weights[6 * i + 2], H * d.D, d.hid, i);
    check_tiles(weights[6 * i + 4], d.hid, 2 * d.I, i);
    check_tiles(weights[6 * i + 5], d.I, d.hid, i);
  }
  return d;
}

// The step's inputs into the workspace (its items may outlive the tensors).
void copy_inputs(const Dims& d, const Buffers& b, const torch::Tensor& cos, const torch::Tensor& sin,
                 const torch::Tensor& slots, const torch::Tensor& block_tables,
                 const torch::Tensor& context_lens) {
  auto cs = cos.contiguous(), sn = sin.contiguous();
  TORCH_CHECK(cs.numel() == d.T * d.D && sn.numel() == d.T * d.D &&
                  cs.scalar_type() == at::kBFloat16 && sn.scalar_type() == at::kBFloat16,
              "decode_layers: cos and sin are bf16 [B, D]");
  auto sl = slots.to(torch::kLong).contiguous();
  auto lens = context_lens.to(torch::kLong).contiguous();
  TORCH_CHECK(sl.numel() == d.T && lens.numel() == d.T && block_tables.dim() == 2 &&
                  block_tables.size(0) == d.T && block_tables.size(1) == d.MB,
              "decode_layers: one slot, block table and length per sequence");
  auto tables = block_tables.to(torch::kLong).contiguous();
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t s = sl.data_ptr<int64_t>()[t];
    TORCH_CHECK(s >= 0 && s < d.slots, "decode_layers: slot ", s, " out of range");
  }
  std::memcpy(b.cos, cs.data_ptr<bf16>(), d.T * d.D * sizeof(bf16));
  std::memcpy(b.sin, sn.data_ptr<bf16>(), d.T * d.D * sizeof(bf16));
  std::memcpy(b.slots, sl.data_ptr<int64_t>(), d.T * sizeof(int64_t));
  std::memcpy(b.tables, tables.data_ptr<int64_t>(), d.T * d.MB * sizeof(int64_t));
  std::memcpy(b.lens, lens.data_ptr<int64_t>(), d.T * sizeof(int64_t));
}

// Every op of the step, in order: the layers, then the final norm into b.fin.
std::vector<Op> program(const Dims& d, const Buffers& b, bf16* kv, int64_t layer_stride,
                        int64_t kv_stride, const std::vector<torch::Tensor>& weights, double eps,
                        double scale) {
  std::vector<Op> ops;
  ops.reserve(9 * d.L + 1);
  const int64_t T = d.T;
  for (int64_t i = 0; i < d.L; ++i) {
    const torch::Tensor* w = weights.data() + 6 * i;
    bf16* kc = kv + i * layer_stride;
    bf16* vc = kc + kv_stride;
    if (i > 0) ops.push_back(add_norm_op(b.xb, b.res, w[0], b.h, T, d.hid, eps));
    ops.push_back(linear_op(b.h, w[1], b.qkv, T));
    ops.push_back(rope_op(b.cos, b.sin, b.slots, b.qkv, kc, vc, T, d.H, d.KVH, d.D));
    ops.push_back(attn_op(b.qkv, kc, vc, b.tables, b.lens, b.attn, T, d.H, d.KVH, d.D, d.BS,
                          d.MB, d.slots / d.BS, scale));
    ops.push_back(linear_op(b.attn, w[2], b.o, T));
    ops.push_back(add_norm_op(b.o, b.res, w[3], b.h, T, d.hid, eps));
    ops.push_back(linear_op(b.h, w[4], b.gu, T));
    ops.push_back(silu_op(b.gu, b.act, T, d.I));
    ops.push_back(linear_op(b.act, w[5], b.xb, T));
  }
  ops.push_back(add_norm_op(b.xb, b.res, weights.back(), b.fin, T, d.hid, eps));
  return ops;
}
}  // namespace

torch::Tensor decode_layers(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                            torch::Tensor kv_cache, torch::Tensor slots,
                            torch::Tensor block_tables, torch::Tensor context_lens,
                            std::vector<torch::Tensor> weights, int64_t H, int64_t KVH,
                            double eps, double scale) {
  Dims d = check_model(x, kv_cache, weights, H, KVH);
  d.MB = block_tables.dim() == 2 ? block_tables.size(1) : 0;
  // one fused step at a time in a process: the workspace and the team are the process's
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  const Buffers b = layout(d);
  copy_inputs(d, b, cos, sin, slots, block_tables, context_lens);
  // layer 0's norm: HF's RMSNorm in bf16 (model.py RMSNorm.forward), torch's ops
  x = x.contiguous();
  const size_t rows = d.T * d.hid * sizeof(bf16);
  std::memcpy(b.res, x.data_ptr<bf16>(), rows);
  auto h0 = (weights[0] * at::rms_norm(x, {d.hid}, c10::nullopt, eps)).contiguous();
  std::memcpy(b.h, h0.data_ptr<bf16>(), rows);
  const auto ops = program(d, b, kv_cache.data_ptr<bf16>(), kv_cache.stride(0),
                           kv_cache.stride(1), weights, eps, scale);
  team_for(at::get_num_threads()).run(ops);
  release_thread_tiles();
  auto out = torch::empty({d.T, d.hid}, x.options());
  std::memcpy(out.data_ptr<bf16>(), b.fin, rows);
  return out;
}
