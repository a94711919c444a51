"""engine.decode_graphs on CPU: decode steps padded to graph buckets and run from the
static buffers (`decode_graphs="pad"`, the CUDA-graph path with the graphs off) give the
eager engine's tokens, batched and alone; the capture itself needs a GPU (skipped here)."""

from __future__ import annotations

import pytest
import torch
from tiny_model import make_tiny_checkpoint

from engine import LLM, SamplingParams
from engine.decode_graphs import buckets_for
from engine.errors import InvalidRequestError

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-graphs"), seed=5)


def _llm(path, **kw) -> LLM:
    return LLM(
        model=str(path), dtype="float32", num_kv_blocks=256, block_size=4, max_num_seqs=6,
        num_threads=1, **kw,
    )  # fmt: skip


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 399, (4 + 5 * i,), generator=g).tolist() for i in range(n)]


def test_buckets_cover_every_batch_size_up_to_the_largest():
    assert buckets_for(6) == [1, 2, 4, 6]
    assert buckets_for(64)[-1] == 64 and buckets_for(300)[-1] == 300
    for n in range(1, 65):
        assert any(b >= n for b in buckets_for(64))


@pytest.mark.parametrize("n", [1, 3, 5])  # 3 and 5: padded to buckets 4 and 6
def test_padded_decode_equals_eager_decode_token_for_token(tiny_dir, n):
    prompts = _prompts(n)
    eager = [o.token_ids for o in _llm(tiny_dir, decode_graphs="off").generate(prompts, GREEDY)]
    padded_llm = _llm(tiny_dir, decode_graphs="pad")
    graphs = padded_llm.engine.runner.graphs
    assert graphs is not None
    runs: list[int] = []
    real_run = graphs.run
    graphs.run = lambda ids, pos, meta: (runs.append(ids.shape[0]), real_run(ids, pos, meta))[1]
    padded = [o.token_ids for o in padded_llm.generate(prompts, GREEDY)]
    assert n in runs  # the decode steps went through the padded path
    assert padded == eager
    alone = [padded_llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert alone == eager  # and a padded batch did not leak into a later request's KV


def test_graphs_are_off_on_cpu_by_default_and_an_unknown_mode_is_refused(tiny_dir):
    assert _llm(tiny_dir).engine.runner.graphs is None
    with pytest.raises(InvalidRequestError, match="decode_graphs"):
        _llm(tiny_dir, decode_graphs="sometimes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_graph_decode_equals_eager_decode_on_cuda(tiny_dir):
    prompts = _prompts(5)
    kw = {"device": "cuda"}
    eager = [
        o.token_ids for o in _llm(tiny_dir, decode_graphs="off", **kw).generate(prompts, GREEDY)
    ]
    graphed = _llm(tiny_dir, decode_graphs="capture", **kw)
    assert graphed.engine.runner.graphs.graphs  # captured
    assert [o.token_ids for o in graphed.generate(prompts, GREEDY)] == eager
