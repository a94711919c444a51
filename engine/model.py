"""A Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over a paged KV cache.

Module names follow HF's so a checkpoint's state dict loads as is. Tokens of a
step are flattened: `input_ids, positions: [T]`; attention layout comes in an
explicit `AttentionMetadata`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine import cpu_kernels
from engine.attention import AttentionMetadata, paged_attention
from engine.config import ModelConfig, RopeScaling
from engine.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """HF's: x / rms(x) in float32, rounded to x's dtype, times the weight in that dtype.
        float32: one fused op; bf16/fp16: the fused op without the weight (it normalizes in
        float32 and rounds once, the same values as HF's five ops), then the weight."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x, self.weight.shape, None, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): HF's residual add and the next norm. bf16 on
        CPU: one fused pass (engine.cpu_kernels) that updates `residual` in place."""
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and residual.is_contiguous():
            kernels = cpu_kernels.load()
            if kernels is not None:
                return kernels.add_rms_norm(x, residual, self.weight, self.eps), residual
        residual = x + residual
        return self(residual), residual


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exps)  # [D/2]
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables, HF's non-interleaved (rotate-half) layout. The sin table's
    first half is negated, so rotate-half is a roll: x * cos + roll(x, D/2) * sin."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        pos = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2]
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", torch.cat((freqs, freqs), dim=-1).cos(), persistent=False)
        sin = freqs.sin()
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, signed sin: [T, 1, D] for the step's positions, computed once for all layers."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; rotate-half(x) * sin == roll(x, D/2) * signed sin, exactly
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    """q, k and v come from one fused projection (`qkv_proj`), gate and up likewise."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        h, d = config.hidden_size, config.head_dim
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.qkv_proj = Linear(h, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, h, bias=False)

    def forward(self, x, rope_cos_sin, kv_layer, meta: AttentionMetadata):
        # x: [T, hidden]; kv_layer: [2, blocks, block_size, KVH, D]
        t, h, kvh = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x)
        kernels = _rope_kernels(qkv, kv_layer)
        if kernels is not None:  # rope and the KV write in one pass, in place
            cos, sin = rope_cos_sin
            kernels.rope_write_kv(
                qkv, cos, sin, kv_layer[0], kv_layer[1], meta.slot_mapping, h, kvh
            )
            q, k, v = qkv.view(t, h + 2 * kvh, self.head_dim).split([h, kvh, kvh], dim=1)
            out = paged_attention(q, k, v, kv_layer[0], kv_layer[1], meta, self.scale, True)
            return self.o_proj(out.reshape(t, -1))
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = apply_rope(qk.view(t, h + kvh, self.head_dim), *rope_cos_sin)
        q, k = qk.split([h, kvh], dim=1)  # q and k roped at once
        v = v.view(t, kvh, self.head_dim)
        out = paged_attention(q, k, v, kv_layer[0], kv_layer[1], meta, self.scale)
        return self.o_proj(out.reshape(t, -1))


def _rope_kernels(qkv: torch.Tensor, kv_layer: torch.Tensor):
    """The CPU kernels where the fused rope + KV write applies (bf16 on CPU), else None."""
    if qkv.dtype != torch.bfloat16 or qkv.device.type != "cpu" or not kv_layer.is_contiguous():
        return None
    return cpu_kernels.load()


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, self.inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = Linear(h, 2 * self.inter, bias=False)
        self.down_proj = Linear(self.inter, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up = [..., 2I]. bf16 on CPU: one fused pass (engine.cpu_kernels,
    in fp32, rounded once); elsewhere torch's ops (float32 stays op for op HF's)."""
    inter = gate_up.shape[-1] // 2
    if gate_up.dtype == torch.bfloat16 and gate_up.device.type == "cpu":
        kernels = cpu_kernels.load()
        if kernels is not None:
            out = kernels.silu_and_mul(gate_up.reshape(-1, 2 * inter))
            return out.view(*gate_up.shape[:-1], inter)
    gate, up = gate_up.split(inter, dim=-1)
    return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, rope_cos_sin, kv_layer, meta):
        """(the MLP's output, the residual stream before it is added): the add is left to
        the next layer's norm (or the final one), which fuses it."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, rope_cos_sin, kv_layer, meta)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.rope = RotaryEmbedding(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor,  # [layers, 2, blocks, block_size, KVH, D]
        meta: AttentionMetadata,
        layer_hook=None,  # called as layer_hook(layer_index) after each layer (KV streaming)
    ) -> torch.Tensor:  # [T, hidden]
        x = self.model.embed_tokens(input_ids)
        rope_cos_sin = self.rope(positions, x.dtype)
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, rope_cos_sin, kv_cache[i], meta)
            if layer_hook is not None:
                layer_hook(i)
        assert residual is not None, "a model has at least one layer"
        return self.model.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> [N, V] float32
        return self.lm_head(hidden).float()

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load an HF-named state dict, concatenating q/k/v and gate/up into fused weights."""
        state = fuse_projections(state_dict)
        params = dict(self.named_parameters())
        missing = [n for n in params if n not in state]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[0]}")
        with torch.no_grad():
            for name, param in params.items():
                if param.shape != state[name].shape:
                    raise ValueError(
                        f"{name}: checkpoint shape {tuple(state[name].shape)} "
                        f"!= model shape {tuple(param.shape)}"
                    )
                param.copy_(state[name])


_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> ours: `layers.i.self_attn.{q,k,v}_proj.*` become `...qkv_proj.*`, etc."""
    out = dict(state)
    for name in list(state):
        for fused, parts in _FUSED.items():
            suffix = "." + parts[0] + "."
            if suffix not in name:
                continue
            prefix, kind = name.split(suffix)
            names = [f"{prefix}.{p}.{kind}" for p in parts]
            out[f"{prefix}.{fused}.{kind}"] = torch.cat([state[n] for n in names], dim=0)
            for n in names:
                out.pop(n)
    return out
