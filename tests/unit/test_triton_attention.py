"""Paged decode attention: the Triton kernel against a dense torch reference.

On CPU the kernel runs under the Triton interpreter in a child process: TRITON_INTERPRET=1 only
works when set before triton is first imported (triton.language's own helpers such as tl.sum are
jit functions decorated at import), and pytest may have imported triton already; setting it here
would also turn every later kernel in this process into an interpreted one. The child runs this
file as a script. On CUDA the compiled kernel is checked in process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from engine.triton_attention import paged_decode_attention_triton  # noqa: E402

NUM_LAYERS = 2
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@dataclass(frozen=True, slots=True)
class Case:
    batch: int
    num_kv_heads: int
    group: int  # query heads per kv head
    head_dim: int
    block_size: int
    dtype: torch.dtype
    max_context: int


def dense_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """softmax(q k^T * scale) v in fp32, gathering each sequence's tokens from its block table."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    group = q.shape[1] // num_kv_heads
    outs = []
    for b, length in enumerate(context_lens.tolist()):
        blocks = block_tables[b, : -(-length // block_size)].long()
        # k, v: [T, H, D]
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:length].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:length].float()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", q[b].float(), k) * scale  # [H, T]
        outs.append(torch.einsum("ht,thd->hd", scores.softmax(dim=-1), v))
    return torch.stack(outs).to(q.dtype)


def make_inputs(case: Case, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q: [B, H, D]; k/v caches sliced from one engine-layout kv tensor; shuffled block tables."""
    gen = torch.Generator().manual_seed(seed)
    context_lens = torch.randint(1, case.max_context + 1, (case.batch,), generator=gen)
    context_lens[0] = 1  # the first decode step after a one-token prompt
    if case.batch > 1:
        context_lens[1] = case.max_context  # longest, rarely a multiple of block_size
    max_blocks = -(-case.max_context // case.block_size) + 1  # + 1: a padding column
    num_blocks = case.batch * max_blocks + 3
    # Non-contiguous, shuffled blocks; padding entries point far outside the cache.
    block_tables = torch.randperm(num_blocks, generator=gen)[: case.batch * max_blocks]
    block_tables = block_tables.view(case.batch, max_blocks).to(torch.int32)
    for b, length in enumerate(context_lens.tolist()):
        block_tables[b, -(-length // case.block_size) :] = 1 << 30
    # kv: [layers, 2, num_blocks, block_size, KVH, D]
    kv_shape = (NUM_LAYERS, 2, num_blocks, case.block_size, case.num_kv_heads, case.head_dim)
    kv = torch.randn(kv_shape, generator=gen).to(case.dtype)
    num_heads = case.num_kv_heads * case.group
    # q as a view of a fused qkv projection, so its batch stride is not H * D.
    qkv = torch.randn(case.batch, num_heads + 2 * case.num_kv_heads, case.head_dim, generator=gen)
    q = qkv.to(case.dtype)[:, :num_heads]
    layer = NUM_LAYERS - 1
    tensors = (q, kv[layer, 0], kv[layer, 1], block_tables, context_lens.to(torch.int32))
    return tuple(t.to(device) for t in tensors)


def check_against_reference(case: Case, device: str) -> None:
    q, k_cache, v_cache, block_tables, context_lens = make_inputs(case, device)
    scale = case.head_dim**-0.5
    out = paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale)
    ref = dense_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    atol = TOLERANCE[case.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=atol)
    if importlib.util.find_spec("engine.attention") is not None:
        from engine.attention import paged_decode_attention

        # The torch path gathers whole block-table rows, so its padding must be valid block ids.
        valid_tables = torch.where(block_tables < k_cache.shape[0], block_tables, 0)
        engine_out = paged_decode_attention(q, k_cache, v_cache, valid_tables, context_lens, scale)
        torch.testing.assert_close(engine_out.float(), ref.float(), atol=atol, rtol=atol)


CPU_CASES = [
    Case(batch=1, num_kv_heads=2, group=1, head_dim=128, block_size=16, dtype=torch.float32,
         max_context=50),
    Case(batch=3, num_kv_heads=3, group=3, head_dim=64, block_size=16, dtype=torch.float32,
         max_context=200),
    Case(batch=4, num_kv_heads=3, group=3, head_dim=64, block_size=32, dtype=torch.bfloat16,
         max_context=133),
    Case(batch=2, num_kv_heads=1, group=1, head_dim=64, block_size=32, dtype=torch.bfloat16,
         max_context=77),
    Case(batch=2, num_kv_heads=2, group=3, head_dim=128, block_size=16, dtype=torch.float16,
         max_context=41),
]  # fmt: skip


@pytest.mark.parametrize("index", range(len(CPU_CASES)), ids=[repr(c) for c in CPU_CASES])
def test_matches_dense_reference_interpreted(index: int) -> None:
    repo_root = Path(__file__).resolve().parents[2]
    pythonpath = os.pathsep.join(p for p in (str(repo_root), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": pythonpath}
    child = subprocess.run(
        [sys.executable, __file__, str(index)], env=env, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stdout + child.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("group", "head_dim"), [(1, 128), (3, 64), (4, 128), (7, 64)])
def test_matches_dense_reference_cuda(group: int, head_dim: int, dtype: torch.dtype) -> None:
    for block_size in (16, 32):
        case = Case(8, 3, group, head_dim, block_size, dtype, max_context=1000)
        check_against_reference(case, "cuda")


def test_imports_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    path = sys.modules[paged_decode_attention_triton.__module__].__file__
    spec = importlib.util.spec_from_file_location("_triton_attention_without_triton", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.triton_available()
    with pytest.raises(RuntimeError, match="triton is not installed"):
        module.paged_decode_attention_triton(*make_inputs(CPU_CASES[0], "cpu"), 1.0)


if __name__ == "__main__":
    # Child of test_matches_dense_reference_interpreted: check one CPU case, interpreted.
    assert os.environ.get("TRITON_INTERPRET") == "1"
    check_against_reference(CPU_CASES[int(sys.argv[1])], "cpu")
