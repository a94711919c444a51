"""A decode step's decoder layers in one C++ call (engine/csrc/decode_layers.cpp).

The layers of engine.model run ~10 Python calls each (norms, the four AMX linears, rope and
the KV write, attention, SwiGLU): over 30 layers ~300 calls, whose Python and dispatch cost
~6 ms a step whatever the batch size. On a CPU with AMX, in bf16, a step of decodes only
runs the same kernel bodies in the same order from one call instead, with the GIL let go for
the whole step: the same hidden states bit for bit (tested against the layers one call at a
time). Its threads (csrc/team.h) claim an op's items one at a time and take over the items
of a thread the OS has preempted, where OpenMP's barriers would wait for it: on a serving
host, where the router, the clients and Ray share the cores, that is what a step loses most.

    ModelRunner.forward ─ decode-only step, bf16, AMX ─> FusedDecode.run ─> decode_layers
                        └ else ───────────────────────> LlamaForCausalLM.forward (layer by layer)
"""

from __future__ import annotations

from typing import cast

import torch

from engine import cpu_kernels
from engine.attention import AttentionMetadata
from engine.linear import AMX_MAX_ROWS
from engine.model import DecoderLayer, LlamaForCausalLM


def _layer_weights(layer: DecoderLayer) -> list[torch.Tensor] | None:
    """A layer's six tensors in decode_layers' order, or None where a linear is not in AMX
    tiles (no AMX, a side not a multiple of 32) or has a bias."""
    attn, mlp = layer.self_attn, layer.mlp
    tiles: list[torch.Tensor] = []
    for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
        if lin.amx is None or lin.bias is not None:
            return None
        tiles.append(lin.amx)
    qkv, o, gate_up, down = tiles
    norms = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
    return [norms[0], qkv, o, norms[1], gate_up, down]


class FusedDecode:
    """The model's weights in the order decode_layers reads them; `build` says whether the
    fused path applies to this model at all, `applies` whether it applies to a step."""

    def __init__(self, model: LlamaForCausalLM, weights: list[torch.Tensor], kernels) -> None:
        self.model, self.weights, self.kernels = model, weights, kernels
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.eps, self.scale = cfg.rms_norm_eps, cfg.head_dim**-0.5

    @classmethod
    def build(cls, model: LlamaForCausalLM, kv_cache: torch.Tensor) -> FusedDecode | None:
        """The fused path for `model`, or None where it does not apply: not bf16 on CPU, a
        head dim other than 64 or 128, a linear not packed in AMX tiles, a bias, the kernels
        not built."""
        if kv_cache.dtype != torch.bfloat16 or kv_cache.device.type != "cpu":
            return None
        if model.config.head_dim not in (64, 128):
            return None
        kernels = cpu_kernels.load()
        if kernels is None or not kv_cache.is_contiguous():
            return None
        weights: list[torch.Tensor] = []
        for layer in model.model.layers:
            tensors = _layer_weights(cast(DecoderLayer, layer))
            if tensors is None:
                return None
            weights += tensors
        weights.append(model.model.norm.weight)
        return cls(model, weights, kernels)

    def applies(self, meta: AttentionMetadata, rows: int) -> bool:
        """A step of decodes only (no prefill chunk), of at most AMX_MAX_ROWS sequences."""
        return 0 < rows == meta.num_decodes <= AMX_MAX_ROWS and not meta.prefills

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [B, hidden], the final norm applied: what the layers would return
        model = self.model
        x = model.model.embed_tokens(input_ids)
        cos, sin = model.rope(positions, x.dtype)
        return self.kernels.decode_layers(
            x, cos, sin, kv_cache, meta.slot_mapping, meta.decode_block_tables,
            meta.decode_context_lens, self.weights, self.heads, self.kv_heads, self.eps,
            self.scale,
        )  # fmt: skip
