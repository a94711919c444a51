"""Weights from a GGUF file: llama.cpp names -> HF Llama names, dequantized, Q/K un-permuted."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

from engine.config import ModelConfig
from engine.errors import UnsupportedModelError

SUPPORTED_TYPES = frozenset(
    {QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q4_K, QType.Q6_K}
)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")
# Tensors that carry nothing the HF layout needs (rope_freqs is read into the config).
_IGNORED = frozenset({"rope_freqs.weight"})


def open_gguf(path: Path) -> gguf.GGUFReader:
    """A reader for `path`; parsing metadata takes seconds, so the last two files are reused."""
    stat = os.stat(path)
    return _open_gguf_cached(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf_cached(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise UnsupportedModelError(f"cannot read GGUF file {path}: {e}") from None


def hf_name(gguf_name: str) -> str | None:
    """The HF Llama state-dict name of a GGUF tensor, or None for one we do not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows (interleaved rope pairs -> HF rotate-half)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `permute` (HF rotate-half rows -> interleaved pairs), for writing test files."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(tensor: gguf.ReaderTensor) -> np.ndarray:
    """The tensor's values as float32, shaped like the HF weight ([out, in] for matrices)."""
    qtype = QType(tensor.tensor_type)
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"unsupported GGUF tensor type {qtype.name} for tensor {tensor.name}"
        )
    values = dequantize(tensor.data, qtype)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # ggml ne is fastest-first
    return np.asarray(values, dtype=np.float32).reshape(shape)


def load_gguf_state_dict(
    path: Path, config: ModelConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """HF-named tensors of `dtype`, equal to what transformers' GGUF loader produces."""
    reader = open_gguf(path)
    expected = config.weight_shapes()
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            if tensor.name in _IGNORED:
                continue
            raise UnsupportedModelError(f"unexpected tensor {tensor.name} in GGUF file")
        if name not in expected:
            raise UnsupportedModelError(f"tensor {tensor.name} does not fit the model config")
        values = dequantize_tensor(tensor)
        if config.architecture != "qwen2":  # llama.cpp permutes Q/K only for llama-style rope
            if ".q_proj." in name:
                values = unpermute_rope_rows(values, config.num_heads)
            elif ".k_proj." in name:
                values = unpermute_rope_rows(values, config.num_kv_heads)
        state[name] = _to_torch(values, name, expected[name], dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UnsupportedModelError(f"GGUF file lacks {len(missing)} tensors, e.g. {missing[0]}")
    return state


def _to_torch(
    values: np.ndarray, name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    if values.shape != shape:
        raise UnsupportedModelError(f"tensor {name} has shape {values.shape}, expected {shape}")
    if not (values.flags.writeable and values.flags.c_contiguous):
        values = np.array(values, order="C")  # own the memory, not a view of the mmap
    return torch.from_numpy(values).to(dtype)
