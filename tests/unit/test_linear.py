"""engine.linear: the packed GEMM path gives F.linear's results at every row count it takes,
and stays out of the way where it does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.linear import (
    AMX_MAX_ROWS,
    PACKED_MAX_ROWS,
    PACKED_MIN_ROWS,
    Linear,
    amx_usable,
    pack_linears,
    packing_available,
)

needs_mkl = pytest.mark.skipif(
    not packing_available(torch.float32, torch.device("cpu")), reason="torch built without MKL"
)


@needs_mkl
@pytest.mark.parametrize("rows", [1, PACKED_MIN_ROWS, 16, 32, 33, PACKED_MAX_ROWS, 200])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_forward_equals_f_linear(rows, bias):
    torch.manual_seed(rows)
    layer = Linear(96, 200, bias=bias)
    layer.pack()
    assert layer.packed is not None
    x = torch.randn(rows, 96)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    # leading dims are kept, and a strided input is read right
    x3 = torch.randn(2, rows, 192)[..., ::2]
    torch.testing.assert_close(layer(x3), F.linear(x3, layer.weight, layer.bias))


needs_bf16 = pytest.mark.skipif(
    not packing_available(torch.bfloat16, torch.device("cpu")), reason="no oneDNN bf16 here"
)


@needs_bf16
@pytest.mark.parametrize("rows", [1, 4, 32, 200])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_packed_forward_equals_f_linear_exactly(rows, bias):
    torch.manual_seed(rows)
    layer = Linear(96, 200, bias=bias).to(torch.bfloat16)
    layer.pack()
    assert layer.packed is not None
    x = torch.randn(2, rows, 192, dtype=torch.bfloat16)[..., ::2]  # strided, leading dims
    expected = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)


def test_other_dtypes_are_never_packed():
    model = torch.nn.Sequential(Linear(8, 8), Linear(8, 8)).to(torch.float16)
    assert pack_linears(model) == 0
    x = torch.randn(8, 8, dtype=torch.float16)
    torch.testing.assert_close(
        model(x),
        F.linear(F.linear(x, model[0].weight, model[0].bias), model[1].weight, model[1].bias),
    )


@needs_mkl
def test_a_repacked_weight_is_what_forward_uses():
    layer = Linear(16, 16, bias=False)
    layer.pack()
    with torch.no_grad():
        layer.weight.mul_(2)
    layer.pack()
    x = torch.randn(8, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))


needs_amx = pytest.mark.skipif(
    not amx_usable(torch.empty(32, 32, dtype=torch.bfloat16)), reason="no AMX on this CPU"
)


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 33, 64, AMX_MAX_ROWS, AMX_MAX_ROWS + 44])
def test_amx_forward_is_the_fp32_product_rounded_once(rows):
    """The AMX kernel sums exact bf16 products in fp32 and rounds once: within one bf16
    rounding of the fp32 product, at every row count (tails of 16 and 32 rows included)."""
    torch.manual_seed(rows)
    layer = Linear(576, 960, bias=False).to(torch.bfloat16)
    layer.pack()
    assert layer.amx is not None
    x = torch.randn(2, rows, 1152, dtype=torch.bfloat16)[..., ::2]  # strided, leading dims
    expected = F.linear(x.float(), layer.weight.float())
    got = layer(x)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2**-8, atol=1e-2)


@needs_amx
def test_amx_is_skipped_for_sides_not_multiple_of_32():
    layer = Linear(96, 200).to(torch.bfloat16)
    layer.pack()
    assert layer.amx is None and layer.packed is not None
