"""Sampling parameters as a user relies on them, on the tiny seeded model."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_model import make_tiny_checkpoint

from engine import LLM, InvalidRequestError, SamplingParams
from engine.sampler import Sampler


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=5)
    return LLM(model=str(path), num_kv_blocks=128, block_size=4, num_threads=1)


PROMPT = [5, 17, 33, 60, 71, 90]


def test_seeded_sampling_is_reproducible_and_seeds_differ(llm):
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=11, ignore_eos=True)
    a, b = llm.generate([PROMPT, PROMPT], [p, p])
    assert a.token_ids == b.token_ids  # same seed, same batch step: same draws
    c = llm.generate(
        [PROMPT], SamplingParams(max_tokens=16, temperature=1.0, seed=12, ignore_eos=True)
    )[0]
    assert c.token_ids != a.token_ids


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate(
        [PROMPT], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    )[0]
    topk1 = llm.generate(
        [PROMPT], SamplingParams(max_tokens=12, temperature=1.5, top_k=1, ignore_eos=True)
    )[0]
    assert topk1.token_ids == greedy.token_ids


def test_max_tokens_and_stop_token_ids(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    stop_id = out.token_ids[2]
    out2 = llm.generate(
        [PROMPT],
        SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id]),
    )[0]
    assert out2.token_ids == out.token_ids[: out.token_ids.index(stop_id) + 1]
    assert out2.finish_reason == "stop"


def test_stop_string_truncates_text(llm):
    full = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[
        0
    ]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = llm.generate(
        [PROMPT], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop])
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_logprobs_are_top_n_of_a_distribution(llm):
    out = llm.generate(
        [PROMPT], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True)
    )[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert len(lp.top_logprobs) == 3
        ids = [i for i, _ in lp.top_logprobs]
        assert ids[0] == tok  # greedy picks the most likely
        vals = [v for _, v in lp.top_logprobs]
        assert vals == sorted(vals, reverse=True) and all(v <= 0 for v in vals)
        assert math.isclose(lp.logprob, vals[0], rel_tol=1e-6)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(seed=0)
    p = SamplingParams(temperature=1.0, top_p=0.7)  # unseeded: the shared generator advances
    seen = {sampler.sample(logits, [f"r{i}"], [p])[0].token_id for i in range(200)}
    assert seen == {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
    ],
)
def test_bad_sampling_params_raise_typed_error(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context_is_rejected_and_leaks_nothing(llm):
    from engine import PromptTooLongError

    too_long = [7] * llm.engine.max_model_len
    with pytest.raises(PromptTooLongError, match="context"):
        llm.generate([PROMPT, too_long], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished()
    assert llm.engine.scheduler.allocator.num_used == 0
