"""Model configuration: a frozen, validated dataclass from HF `config.json` or GGUF metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import UnsupportedModelError

if TYPE_CHECKING:
    import gguf

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

# (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) that Llama 3.x
# releases use; a GGUF stores only the resulting per-frequency divisors (`rope_freqs.weight`).
_LLAMA3_ROPE_CANDIDATES = ((8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 4.0, 8192))


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama-3-style frequency-dependent RoPE scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.original_max_position_embeddings <= 0:
            raise UnsupportedModelError(f"invalid rope scaling: {self}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise UnsupportedModelError(f"invalid rope scaling frequency factors: {self}")

    def inv_freq_divisors(self, head_dim: int, rope_theta: float) -> np.ndarray:
        """What each of the `head_dim // 2` inverse frequencies is divided by (llama.cpp's view)."""
        inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        wavelen = 2 * math.pi / inv_freq
        old_len = self.original_max_position_embeddings
        smooth = (old_len / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        scaled = 1.0 / ((1 - smooth) / self.factor + smooth)
        divisors = np.where(wavelen > old_len / self.low_freq_factor, self.factor, scaled)
        return np.where(wavelen < old_len / self.high_freq_factor, 1.0, divisors)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape of a Llama-family decoder; weights use HF Llama state-dict names."""

    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections (Qwen2)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UnsupportedModelError(
                    f"model config {name} must be a positive int, got {value!r}"
                )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim {self.head_dim} must be even for RoPE")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise UnsupportedModelError("model config rms_norm_eps and rope_theta must be positive")

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the model needs, by HF Llama state-dict name, with its shape."""
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
            "model.norm.weight": (self.hidden_size,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (self.hidden_size,)
            shapes[p + "post_attention_layernorm.weight"] = (self.hidden_size,)
            shapes[p + "self_attn.q_proj.weight"] = (q_dim, self.hidden_size)
            shapes[p + "self_attn.k_proj.weight"] = (kv_dim, self.hidden_size)
            shapes[p + "self_attn.v_proj.weight"] = (kv_dim, self.hidden_size)
            shapes[p + "self_attn.o_proj.weight"] = (self.hidden_size, q_dim)
            if self.attention_bias:
                shapes[p + "self_attn.q_proj.bias"] = (q_dim,)
                shapes[p + "self_attn.k_proj.bias"] = (kv_dim,)
                shapes[p + "self_attn.v_proj.bias"] = (kv_dim,)
            shapes[p + "mlp.gate_proj.weight"] = (self.intermediate_size, self.hidden_size)
            shapes[p + "mlp.up_proj.weight"] = (self.intermediate_size, self.hidden_size)
            shapes[p + "mlp.down_proj.weight"] = (self.hidden_size, self.intermediate_size)
        return shapes

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """From an HF `config.json` (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""
        arch = d.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"unsupported model_type {arch!r} in config.json")
        if arch != "qwen2" and d.get("attention_bias"):  # HF Llama then also has o_proj.bias
            raise UnsupportedModelError(
                f"{arch} with attention_bias (o_proj bias) is not supported"
            )
        try:
            num_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            rope = dict(d.get("rope_parameters") or {})
            max_pos = int(d.get("max_position_embeddings", 2048))
            # Mistral's sliding window equals full attention as long as the context fits in it.
            if d.get("sliding_window") and d.get("use_sliding_window", arch == "mistral"):
                max_pos = min(max_pos, int(d["sliding_window"]))
            return cls(
                architecture=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(d.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(d.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                rope_scaling=_hf_rope_scaling(d.get("rope_scaling") or rope),
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
            )
        except KeyError as e:
            raise UnsupportedModelError(f"config.json is missing {e.args[0]!r}") from None

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> ModelConfig:
        """From GGUF metadata (`{arch}.*` keys) and which tensors the file holds."""
        arch = _field(reader, "general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}")
        tensors = {t.name for t in reader.tensors}

        def key(name: str, default: Any = None) -> Any:
            value = _field(reader, f"{arch}.{name}", default)
            if value is None:
                raise UnsupportedModelError(f"GGUF metadata is missing {arch}.{name}")
            return value

        num_heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
        head_dim = _field(reader, f"{arch}.attention.key_length") or _field(
            reader, f"{arch}.rope.dimension_count", hidden // num_heads
        )
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else 0)
        theta = float(key("rope.freq_base", 10000.0))
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(key("attention.head_count_kv", num_heads)),
            head_dim=int(head_dim),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta,
            rope_scaling=_gguf_rope_scaling(reader, arch, int(head_dim), theta),
            max_position_embeddings=int(key("context_length")),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
        )


def _hf_rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise UnsupportedModelError(f"unsupported rope scaling type {kind!r}")
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def _gguf_rope_scaling(
    reader: gguf.GGUFReader, arch: str, head_dim: int, theta: float
) -> RopeScaling | None:
    """None, or the llama3 parameters that reproduce the file's `rope_freqs.weight` divisors."""
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    if kind not in ("none", "llama3"):
        raise UnsupportedModelError(f"unsupported GGUF rope scaling type {kind!r}")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    divisors = np.asarray(freqs.data, dtype=np.float64).reshape(-1)
    for factor, low, high, orig in _LLAMA3_ROPE_CANDIDATES:
        scaling = RopeScaling(factor, low, high, orig)
        expected = scaling.inv_freq_divisors(head_dim, theta)
        if expected.shape == divisors.shape and np.allclose(expected, divisors, rtol=1e-3):
            return scaling
    raise UnsupportedModelError("GGUF rope_freqs.weight matches no known llama3 rope scaling")


def _field(reader: gguf.GGUFReader, name: str, default: Any = None) -> Any:
    """A scalar or string metadata value, or `default` when absent."""
    field = reader.fields.get(name)
    return default if field is None else field.contents()
