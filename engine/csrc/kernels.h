// The kernels' entry points: the Python module binds them (bindings.cpp), and the fused decode
// forward (decode_layers.cpp) calls them directly, with no Python between them.
#pragma once
#include <torch/extension.h>

#include <vector>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale);
torch::Tensor silu_and_mul(torch::Tensor x);
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight,
                           double eps);
void rope_write_kv(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                   torch::Tensor v_cache, torch::Tensor slots, int64_t H, int64_t KVH);
bool amx_available();
torch::Tensor amx_linear(torch::Tensor x, torch::Tensor packed);
void prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor out, std::vector<int64_t> starts, std::vector<int64_t> lens,
                       std::vector<int64_t> ctx, std::vector<torch::Tensor> tables,
                       double scale);
torch::Tensor decode_layers(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                            torch::Tensor kv_cache, torch::Tensor slots,
                            torch::Tensor block_tables, torch::Tensor context_lens,
                            std::vector<torch::Tensor> weights, int64_t H, int64_t KVH,
                            double eps, double scale);
// KV pages copied with their CRC-32C taken on the way (copy_crc.cpp): the sum is of the bytes
// copied, in flat order; `crc` carries a sum over several calls (crc32c.crc32c's convention).
uint32_t copy_crc32c(py::buffer dst, py::buffer src, uint32_t crc);
uint32_t copy_blocks_crc32c(py::buffer flat, py::buffer blocks, int64_t block_bytes,
                            std::vector<int64_t> ids, bool into_blocks, uint32_t crc);
