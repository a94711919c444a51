// A decode step's decoder layers in one call (engine/fused_decode.py): bf16 on a CPU with AMX.
//
// The same kernels, in the same order, as engine/model.py's layers run one Python call at a
// time, so the result is the same bit for bit; what goes is the Python and the op dispatch
// around ~10 calls a layer (~4 ms of a batch-1 step over 30 layers).
//
//   weights: 6 per layer (input norm, qkv tiles, o tiles, post-attention norm, gate_up tiles,
//            down tiles), then the final norm; tiles as engine/linear.amx_pack makes them.
//   layer:   h = norm(x + residual) (layer 0: norm(x)); qkv = h Wqkv; rope q, k and write k, v
//            to their slots; a = attention(q) over the pages; h = a Wo;
//            h = norm(h + residual); x = silu_and_mul(h Wgate_up) Wdown
//   returns  norm(x + residual) with the final norm: the hidden states for the logits.
#include "kernels.h"

namespace {
// HF's RMSNorm in bf16 (engine/model.py RMSNorm.forward): normalized in fp32 and rounded
// once by the fused op, then times the weight in bf16.
torch::Tensor first_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  return weight * at::rms_norm(x, {x.size(-1)}, c10::nullopt, eps);
}
}  // namespace

torch::Tensor decode_layers(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                            torch::Tensor kv_cache, torch::Tensor slots,
                            torch::Tensor block_tables, torch::Tensor context_lens,
                            std::vector<torch::Tensor> weights, int64_t H, int64_t KVH,
                            double eps, double scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "decode_layers: x is [B, hidden]");
  const int64_t L = kv_cache.size(0), T = x.size(0), D = kv_cache.size(-1);
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(1) == 2 && kv_cache.is_contiguous(),
              "decode_layers: kv_cache is a contiguous [layers, 2, blocks, block_size, KVH, D]");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 6 * L + 1,
              "decode_layers: 6 weights a layer and the final norm");
  torch::Tensor residual = x, h;
  for (int64_t i = 0; i < L; ++i) {
    const torch::Tensor* w = weights.data() + 6 * i;
    h = i == 0 ? first_norm(x, w[0], eps) : add_rms_norm(x, residual, w[0], eps);
    torch::Tensor qkv = amx_linear(h, w[1]);
    torch::Tensor kv = kv_cache.select(0, i);
    torch::Tensor k_cache = kv.select(0, 0), v_cache = kv.select(0, 1);
    rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, H, KVH);
    torch::Tensor q = qkv.view({T, H + 2 * KVH, D}).narrow(1, 0, H);
    torch::Tensor a = paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale);
    h = add_rms_norm(amx_linear(a.view({T, H * D}), w[2]), residual, w[3], eps);
    x = amx_linear(silu_and_mul(amx_linear(h, w[4])), w[5]);
  }
  return add_rms_norm(x, residual, weights.back(), eps);
}
