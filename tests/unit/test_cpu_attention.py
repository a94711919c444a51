"""engine.cpu_attention: the C++ page-walking decode kernel equals dense attention over each
sequence's own tokens (GQA, ragged lengths, scattered pages), and the engine uses it."""

from __future__ import annotations

import pytest
import torch

from engine import cpu_attention, cpu_kernels
from engine.attention import paged_decode_attention

pytestmark = pytest.mark.skipif(
    cpu_kernels.load() is None, reason="no C++ compiler: the torch path serves"
)


def _dense(q, k_cache, v_cache, tables, lens, scale):
    b, h, d = q.shape
    kvh = k_cache.shape[2]
    out = torch.empty_like(q)
    for i in range(b):
        k = k_cache[tables[i]].reshape(-1, kvh, d)[: lens[i]].repeat_interleave(h // kvh, 1)
        v = v_cache[tables[i]].reshape(-1, kvh, d)[: lens[i]].repeat_interleave(h // kvh, 1)
        probs = torch.softmax(torch.einsum("hd,lhd->hl", q[i], k) * scale, dim=-1)
        out[i] = torch.einsum("hl,lhd->hd", probs, v)
    return out


@pytest.mark.parametrize(
    ("h", "kvh", "d", "bs"), [(9, 3, 64, 16), (4, 4, 16, 4), (8, 1, 32, 8), (8, 2, 128, 4)]
)
def test_kernel_equals_dense_attention(h, kvh, d, bs):
    torch.manual_seed(h * 100 + kvh)
    b, nblocks, width = 5, 64, 7
    k_cache, v_cache = torch.randn(2, nblocks, bs, kvh, d).unbind(0)
    tables = torch.stack([torch.randperm(nblocks)[:width] for _ in range(b)])
    lens = torch.tensor([1, bs, bs + 1, 3 * bs - 1, width * bs], dtype=torch.int32)
    q = torch.randn(b, h, d)
    out = cpu_attention.paged_decode_attention_cpu(q, k_cache, v_cache, tables, lens, d**-0.5)
    assert out is not None
    expected = _dense(q, k_cache, v_cache, tables, lens, d**-0.5)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(
        out, paged_decode_attention(q, k_cache, v_cache, tables, lens, d**-0.5)
    )


def test_kernel_reads_a_strided_query_and_leaves_other_dtypes_to_torch():
    k_cache, v_cache = torch.randn(2, 8, 4, 2, 16).unbind(0)
    tables, lens = torch.tensor([[3, 1]]), torch.tensor([6])
    qk = torch.randn(1, 6, 16)  # q is a view of a wider tensor, as the model makes it
    q = qk[:, :4]
    out = cpu_attention.paged_decode_attention_cpu(q, k_cache, v_cache, tables, lens, 0.25)
    torch.testing.assert_close(out, _dense(q, k_cache, v_cache, tables, lens, 0.25))
    half = (q.half(), k_cache.half(), v_cache.half())
    assert cpu_attention.paged_decode_attention_cpu(*half, tables, lens, 0.25) is None


@pytest.mark.parametrize(("h", "kvh", "d", "bs"), [(9, 3, 64, 16), (8, 2, 128, 4), (4, 4, 32, 8)])
def test_bf16_kernel_equals_dense_fp32_attention_over_the_same_bf16_values(h, kvh, d, bs):
    """bf16 K/V are widened to fp32 and summed in fp32: the result is the fp32 attention of
    the bf16 values, rounded once to bf16: within one bf16 step of it (the fp32 sums may round
    the other way at a tie), and close to what the torch path gives."""
    torch.manual_seed(7)
    b, nblocks, width = 4, 128, 24
    k_cache, v_cache = torch.randn(2, nblocks, bs, kvh, d).bfloat16().unbind(0)
    tables = torch.stack([torch.randperm(nblocks)[:width] for _ in range(b)])
    lens = torch.tensor([1, 17, 50, width * bs])
    q = torch.randn(b, h, d).bfloat16()
    out = cpu_attention.paged_decode_attention_cpu(q, k_cache, v_cache, tables, lens, d**-0.5)
    assert out is not None and out.dtype == torch.bfloat16
    as32 = (q.float(), k_cache.float(), v_cache.float())
    expected = _dense(*as32, tables, lens, d**-0.5)
    torch.testing.assert_close(out.float(), expected, atol=1e-3, rtol=2**-7)
    torch_path = paged_decode_attention(q, k_cache, v_cache, tables, lens, d**-0.5)
    torch.testing.assert_close(out.float(), torch_path.float(), atol=2e-2, rtol=2e-2)
