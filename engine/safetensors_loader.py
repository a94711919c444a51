"""Weights from an HF checkpoint directory: `model.safetensors` or an indexed set of shards."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.errors import UnsupportedModelError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, in a stable order."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise UnsupportedModelError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir} (only safetensors are supported)"
    )


def load_safetensors_state_dict(
    model_dir: Path, config: ModelConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """HF-named tensors of `dtype`, read one at a time; extras (e.g. `rotary_emb.inv_freq`,
    a tied checkpoint's redundant `lm_head.weight`) are skipped."""
    expected = config.weight_shapes()
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(model_dir):
        if not file.is_file():
            raise UnsupportedModelError(f"checkpoint shard {file} is missing")
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name not in expected:
                    continue
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != expected[name]:
                    raise UnsupportedModelError(
                        f"tensor {name} has shape {tuple(tensor.shape)}, expected {expected[name]}"
                    )
                state[name] = tensor.to(dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UnsupportedModelError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    return state
