"""engine.cpu_attention.prefill_attention_cpu: the AMX kernel for prefill chunks equals causal
attention over each chunk's context (whole prompts and chunks after a cached prefix, ragged,
in one call; GQA; head dims 64 and 128; K and V read from scattered pages), writes only its
chunks' rows, and the engine's attention uses it for every chunk of a step."""

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
BS = 16


def _step(h, kvh, d, chunks, seed):
    """q rows for `chunks` [(rows, context)] side by side (3 pad rows before and after), and a
    cache of scattered pages holding each chunk's whole context: (q, k_cache, v_cache, the
    kernel's chunk tuples, each chunk's full K and V)."""
    g = torch.Generator().manual_seed(seed)
    t = sum(n for n, _ in chunks) + 6
    q = torch.randn(t, h + 2 * kvh, d, generator=g).bfloat16()[:, :h]  # a view, as the model's
    blocks = sum(-(-c // BS) for _, c in chunks) + 4
    k_cache, v_cache = torch.randn(2, blocks, BS, kvh, d, generator=g).bfloat16().unbind(0)
    order = torch.randperm(blocks, generator=g)
    args, kv, row, used = [], [], 3, 0
    for n, ctx in chunks:
        table = order[used : used + -(-ctx // BS)]
        used += len(table)
        args.append((row, n, ctx, table))
        kv.append(tuple(c[table].reshape(-1, kvh, d)[:ctx] for c in (k_cache, v_cache)))
        row += n
    return q, k_cache, v_cache, args, kv


def _reference(q, args, kv, scale, dtype):
    """Each chunk's rows attending to its context causally, in `dtype` (fp32: exact enough;
    bf16: what torch's own kernel gives)."""
    out = torch.zeros(q.shape, dtype=dtype)
    for (row, n, ctx, _), (k, v) in zip(args, kv, strict=True):
        pos = torch.arange(ctx - n, ctx)[:, None]
        allowed = torch.arange(ctx)[None, :] <= pos
        qh, kh, vh = (x.to(dtype).transpose(0, 1)[None] for x in (q[row : row + n], k, v))
        o = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=allowed, scale=scale, enable_gqa=True
        )
        out[row : row + n] = o[0].transpose(0, 1)
    return out


@pytest.mark.parametrize(
    ("h", "kvh", "d", "chunks"),
    [
        (9, 3, 64, [(1, 1), (5, 5), (31, 31), (32, 32), (33, 33), (100, 100), (257, 257)]),
        (9, 3, 64, [(128, 128)] * 3),
        (9, 3, 64, [(20, 52), (1, 40), (100, 357), (64, 64), (17, 49)]),  # after cached prefixes
        (8, 2, 128, [(70, 70), (200, 230)]),
        (4, 4, 64, [(300, 300)]),
        (8, 1, 64, [(16, 16), (48, 80)]),
    ],
)
def test_kernel_equals_causal_attention_over_each_context(h, kvh, d, chunks):
    q, k_cache, v_cache, args, kv = _step(h, kvh, d, chunks, seed=len(chunks) * 100 + h)
    assert cpu_attention.prefill_kernel_applies(q, k_cache)
    out = torch.full((q.shape[0], h, d), 7.0, dtype=torch.bfloat16)
    cpu_attention.prefill_attention_cpu(q, k_cache, v_cache, out, args, d**-0.5)

    rows = slice(3, q.shape[0] - 3)
    exact = _reference(q, args, kv, d**-0.5, torch.float32)[rows]
    torch_bf16 = _reference(q, args, kv, d**-0.5, torch.bfloat16)[rows].float()
    kernel_err = (out[rows].float() - exact).abs().max().item()
    torch_err = (torch_bf16 - exact).abs().max().item()
    assert kernel_err <= 2 * torch_err + 1e-3, (kernel_err, torch_err)
    assert (out[:3] == 7).all() and (out[-3:] == 7).all()  # only the chunks' rows


def test_a_later_token_does_not_change_earlier_rows():
    q, k_cache, v_cache, args, _ = _step(9, 3, 64, [(96, 96)], seed=1)
    first = torch.empty(q.shape[0], 9, 64, dtype=torch.bfloat16)
    cpu_attention.prefill_attention_cpu(q, k_cache, v_cache, first, args, 0.125)
    table = args[0][3]
    for c, fill in ((k_cache, 100.0), (v_cache, -100.0)):  # keys 60.. of the prompt changed
        c.view(-1, 3, 64)[(table.repeat_interleave(BS) * BS + torch.arange(BS).repeat(6))[60:]] = (
            fill
        )
    second = torch.empty_like(first)
    cpu_attention.prefill_attention_cpu(q, k_cache, v_cache, second, args, 0.125)
    assert torch.equal(first[3:63], second[3:63])
    assert not torch.equal(first[63:99], second[63:99])


def test_other_head_dims_and_dtypes_are_left_to_torch():
    cache = torch.zeros(4, BS, 2, 32).bfloat16()
    assert not cpu_attention.prefill_kernel_applies(torch.randn(8, 4, 32).bfloat16(), cache)
    cache32 = torch.zeros(4, BS, 2, 64)
    assert not cpu_attention.prefill_kernel_applies(torch.randn(8, 4, 64), cache32)


def test_a_block_outside_the_cache_is_refused():
    q, k_cache, v_cache, args, _ = _step(9, 3, 64, [(20, 20)], seed=3)
    row, n, ctx, _ = args[0]
    out = torch.empty(q.shape[0], 9, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_attention.prefill_attention_cpu(
            q, k_cache, v_cache, out, [(row, n, ctx, torch.tensor([0, 999]))], 0.125
        )


def test_paged_attention_sends_every_prefill_chunk_to_the_kernel(monkeypatch):
    """A step of one decode, two whole prompts of different lengths and one chunk after a
    cached prefix: the kernel takes the three chunks in one call, and the step's output equals
    the one torch's paths give."""
    torch.manual_seed(2)
    h, kvh, d = 9, 3, 64
    k_cache, v_cache = torch.randn(2, 32, BS, kvh, d).bfloat16().unbind(0)
    prefills = [
        PrefillChunkMeta(1, 40, 40, torch.tensor([4, 5, 6])),
        PrefillChunkMeta(41, 70, 70, torch.tensor([7, 8, 9, 10, 11])),
        PrefillChunkMeta(111, 20, 52, torch.tensor([12, 13, 14, 15])),  # 32 cached tokens
    ]

    def slots(p):
        every = p.block_ids.repeat_interleave(BS) * BS + torch.arange(BS).repeat(len(p.block_ids))
        return every[p.context_len - p.query_len : p.context_len]

    meta = AttentionMetadata(
        slot_mapping=torch.cat([torch.tensor([3 * BS + 5])] + [slots(p) for p in prefills]),
        num_decodes=1,
        decode_block_tables=torch.tensor([[0, 1, 2, 3]]),
        decode_context_lens=torch.tensor([54], dtype=torch.int32),
        prefills=prefills,
    )
    q, k, v = torch.randn(131, h + 2 * kvh, d).bfloat16().split([h, kvh, kvh], dim=1)
    calls = []
    real = cpu_attention.prefill_attention_cpu

    def spy(*args):
        calls.append([c[:3] for c in args[4]])
        real(*args)

    monkeypatch.setattr(attention, "prefill_attention_cpu", spy)
    with_kernel = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, d**-0.5)
    assert calls == [[(1, 40, 40), (41, 70, 70), (111, 20, 52)]]

    monkeypatch.setattr(attention, "prefill_kernel_applies", lambda q, k: False)
    torch_paths = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, d**-0.5)
    assert len(calls) == 1
    diff = (with_kernel.float() - torch_paths.float()).abs()
    assert diff[:1].max() == 0  # the decode row: the same kernel either way
    assert diff.max() < 0.05
