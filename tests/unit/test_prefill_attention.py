"""engine.cpu_attention.prefill_attention_cpu: the AMX kernel for whole prompts equals causal
attention over each prompt's own tokens (ragged lengths in one call, GQA, head dims 64 and 128,
views of a fused qkv), writes only its prompts' rows, and the engine's attention uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import attention, cpu_attention, cpu_kernels
from engine.attention import AttentionMetadata, PrefillChunkMeta, paged_attention

_kernels = cpu_kernels.load()
pytestmark = pytest.mark.skipif(
    _kernels is None or not _kernels.amx_available(), reason="no AMX here: torch's SDPA serves"
)


def _causal(q, k, v, starts, lens, scale, dtype):
    """Each prompt's causal attention in `dtype` (fp32: the reference; bf16: torch's SDPA)."""
    out = torch.zeros(q.shape, dtype=dtype)
    for s, n in zip(starts, lens, strict=True):
        qh, kh, vh = (x[s : s + n].to(dtype).transpose(0, 1)[None] for x in (q, k, v))
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        out[s : s + n] = o[0].transpose(0, 1)
    return out


@pytest.mark.parametrize(
    ("h", "kvh", "d", "lens"),
    [
        (9, 3, 64, [1, 5, 31, 32, 33, 100, 257]),
        (9, 3, 64, [128, 128, 128]),
        (8, 2, 128, [70, 200]),
        (4, 4, 64, [300]),
        (8, 1, 64, [16, 48]),
    ],
)
def test_kernel_equals_causal_attention_of_each_prompt(h, kvh, d, lens):
    torch.manual_seed(sum(lens) + h)
    pad = 3
    t = sum(lens) + 2 * pad
    qkv = torch.randn(t, h + 2 * kvh, d).bfloat16()
    q, k, v = qkv.split([h, kvh, kvh], dim=1)  # strided views, as the model passes them
    starts = [pad + sum(lens[:i]) for i in range(len(lens))]
    assert cpu_attention.prefill_kernel_applies(q, k)
    out = torch.full((t, h, d), 7.0, dtype=torch.bfloat16)
    cpu_attention.prefill_attention_cpu(q, k, v, out, starts, lens, d**-0.5)

    rows = slice(pad, t - pad)
    exact = _causal(q, k, v, starts, lens, d**-0.5, torch.float32)[rows]
    sdpa = _causal(q, k, v, starts, lens, d**-0.5, torch.bfloat16)[rows].float()
    kernel_err = (out[rows].float() - exact).abs().max().item()
    sdpa_err = (sdpa - exact).abs().max().item()
    assert kernel_err <= 2 * sdpa_err + 1e-3, (kernel_err, sdpa_err)
    assert (out[:pad] == 7).all() and (out[t - pad :] == 7).all()  # only the prompts' rows


def test_a_later_token_does_not_change_earlier_rows():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 96, 3, 64).bfloat16().unbind(0)
    q = q.repeat_interleave(3, dim=1)  # 9 query heads over 3 KV heads
    first = torch.empty(96, 9, 64, dtype=torch.bfloat16)
    cpu_attention.prefill_attention_cpu(q, k, v, first, [0], [96], 0.125)
    k2, v2 = k.clone(), v.clone()
    k2[60:], v2[60:] = 100.0, -100.0
    second = torch.empty_like(first)
    cpu_attention.prefill_attention_cpu(q, k2, v2, second, [0], [96], 0.125)
    assert torch.equal(first[:60], second[:60])
    assert not torch.equal(first[60:], second[60:])


def test_other_head_dims_and_dtypes_are_left_to_torch():
    q32 = torch.randn(8, 4, 32).bfloat16()
    assert not cpu_attention.prefill_kernel_applies(q32, q32)
    qf = torch.randn(8, 4, 64)
    assert not cpu_attention.prefill_kernel_applies(qf, qf)


def test_paged_attention_sends_fresh_prompts_to_the_kernel_and_cached_chunks_elsewhere(
    monkeypatch,
):
    """A step of one decode, two fresh prompts of different lengths and one chunk after a
    cached prefix: the kernel takes the fresh prompts in one call, and the step's output equals
    the one the torch paths give."""
    torch.manual_seed(2)
    h, kvh, d, bs = 9, 3, 64, 16
    k_cache, v_cache = torch.randn(2, 32, bs, kvh, d).bfloat16().unbind(0)
    prefills = [
        PrefillChunkMeta(1, 40, 40, torch.tensor([4, 5, 6])),
        PrefillChunkMeta(41, 70, 70, torch.tensor([7, 8, 9, 10, 11])),
        PrefillChunkMeta(111, 20, 52, torch.tensor([12, 13, 14, 15])),  # 32 cached tokens
    ]
    t = 131
    slots = torch.cat(
        [torch.tensor([3 * bs + 5])]
        + [
            (p.block_ids.repeat_interleave(bs) * bs + torch.arange(bs).repeat(len(p.block_ids)))[
                p.context_len - p.query_len : p.context_len
            ]
            for p in prefills
        ]
    )
    meta = AttentionMetadata(
        slot_mapping=slots,
        num_decodes=1,
        decode_block_tables=torch.tensor([[0, 1, 2, 3]]),
        decode_context_lens=torch.tensor([54], dtype=torch.int32),
        prefills=prefills,
    )
    q, k, v = torch.randn(t, h + 2 * kvh, d).bfloat16().split([h, kvh, kvh], dim=1)
    calls = []
    real = cpu_attention.prefill_attention_cpu

    def spy(*args):
        calls.append((args[4], args[5]))
        real(*args)

    monkeypatch.setattr(attention, "prefill_attention_cpu", spy)
    with_kernel = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, d**-0.5)
    assert calls == [([1, 41], [40, 70])]

    monkeypatch.setattr(attention, "prefill_kernel_applies", lambda q, k: False)
    torch_paths = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, d**-0.5)
    assert len(calls) == 1
    diff = (with_kernel.float() - torch_paths.float()).abs()
    assert diff[111:].max() == 0 and diff[:1].max() == 0  # other paths: the same
    assert diff.max() < 0.05
