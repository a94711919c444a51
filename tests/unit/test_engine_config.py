"""EngineConfig's dtype: `auto` resolves once, to what the host computes natively."""

from __future__ import annotations

import pytest
import torch

from engine.engine_config import EngineConfig, native_dtype
from engine.errors import InvalidRequestError


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(False, False, "float32"), (True, False, "bfloat16"), (False, True, "bfloat16")],
)
def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert native_dtype("cpu") == expected
    config = EngineConfig(dtype="auto", device="cpu")
    assert config.dtype == expected  # resolved in the config every worker is given
    assert config.torch_dtype == getattr(torch, expected)


def test_auto_on_a_gpu_follows_its_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert native_dtype("cuda") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert native_dtype("cuda") == "bfloat16"


def test_an_explicit_dtype_is_kept_and_an_unknown_one_is_refused():
    assert EngineConfig(dtype="float32", device="cpu").dtype == "float32"
    with pytest.raises(InvalidRequestError, match="auto, float32"):
        EngineConfig(dtype="float64")
