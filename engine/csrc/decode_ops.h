// The ops of a fused decode step (decode_layers.cpp), as Team items (team.h): bf16 buffers,
// AMX weight tiles (engine/linear.amx_pack). Rows are the step's sequences, T of them.
#pragma once
#include <torch/extension.h>

#include "team.h"

using bf16 = c10::BFloat16;

// y [T, N] = x [T, K] @ weight.T; an item is 32 output columns.
Op linear_op(const bf16* x, const torch::Tensor& tiles, bf16* y, int64_t T);
// residual += x (in place); out = weight * norm(residual); an item is 4 rows.
Op add_norm_op(const bf16* x, bf16* res, const torch::Tensor& w, bf16* out, int64_t T,
               int64_t H, double eps);
// q and k of qkv [T, (H + 2 KVH) D] roped in place, k and v to their cache slots; per token.
Op rope_op(const bf16* cos, const bf16* sin, const int64_t* slots, bf16* qkv, bf16* k_cache,
           bf16* v_cache, int64_t T, int64_t H, int64_t KVH, int64_t D);
// out [T, H D]: decode attention of qkv's q over the pages (a cache of `blocks` blocks); per
// (sequence, KV head).
Op attn_op(const bf16* qkv, const bf16* k_cache, const bf16* v_cache, const int64_t* tables,
           const int64_t* lens, bf16* out, int64_t T, int64_t H, int64_t KVH, int64_t D,
           int64_t BS, int64_t MB, int64_t blocks, double scale);
// out [T, I] = silu(gate) * up of gate_up [T, 2I]; an item is 4 rows.
Op silu_op(const bf16* gate_up, bf16* out, int64_t T, int64_t I);
