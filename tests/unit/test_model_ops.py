"""The model's fused elementwise paths give what HF's unfused ops give."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_kernels
from engine.model import RMSNorm, silu_and_mul


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype  # transformers' LlamaRMSNorm.forward, op for op
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_rms_norm_equals_hf(dtype, rows):
    torch.manual_seed(rows)
    norm = RMSNorm(576, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576) * 0.2 + 1)
    x = (torch.randn(rows, 576) * 4).to(dtype)
    expected = _hf_rms_norm(x, norm.weight, norm.eps)
    if dtype == torch.bfloat16:
        torch.testing.assert_close(norm(x), expected, atol=0, rtol=0)
    else:  # one fused op: float32 rounding order differs by an ulp at most
        torch.testing.assert_close(norm(x), expected)


@pytest.mark.skipif(cpu_kernels.load() is None, reason="no C++ compiler: torch's ops serve")
@pytest.mark.parametrize("shape", [(1, 1536), (33, 1536), (5, 40)])
def test_bf16_silu_and_mul_is_the_fp32_result_rounded_once(shape):
    torch.manual_seed(shape[0])
    rows, inter = shape
    gate_up = (torch.randn(rows, 2 * inter) * 6).bfloat16()
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # far tails and zeros
    out = silu_and_mul(gate_up)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, inter)
    gate, up = gate_up.float().split(inter, dim=-1)
    exact = F.silu(gate) * up
    # one rounding of a value within a few fp32 ulps of the exact one: one bf16 step at most
    torch.testing.assert_close(out.float(), exact, atol=1e-30, rtol=2**-8)
    unfused = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # torch's bf16 ops round twice
    torch.testing.assert_close(out.float(), unfused.float(), atol=1e-30, rtol=2**-7)


def test_float32_silu_and_mul_is_torchs_ops():
    gate_up = torch.randn(3, 64)
    expected = F.silu(gate_up[:, :32]) * gate_up[:, 32:]
    torch.testing.assert_close(silu_and_mul(gate_up), expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 33])
def test_add_forward_is_hfs_residual_add_then_norm(dtype, rows):
    torch.manual_seed(rows)
    norm = RMSNorm(576, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576) * 0.2 + 1)
    x, residual = ((torch.randn(rows, 576) * 3).to(dtype) for _ in range(2))
    summed = x + residual  # HF: hidden = residual + hidden, in the model's dtype
    expected = _hf_rms_norm(summed, norm.weight, norm.eps)
    out, new_residual = norm.add_forward(x, residual.clone())
    torch.testing.assert_close(new_residual, summed, atol=0, rtol=0)
    # bf16 fused: its fp32 sum of squares may round the other way: one bf16 step at most
    tol = {"atol": 1e-6, "rtol": 2**-7} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out.float(), expected.float(), **tol)
    if dtype == torch.bfloat16:  # and nearly always exactly
        assert (out != expected).float().mean() < 0.01
