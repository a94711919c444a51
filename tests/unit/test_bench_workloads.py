"""The benchmark's pure parts: workloads and throughput arithmetic (no model, no torch)."""

from __future__ import annotations

import argparse
import math

import pytest

from bench.workloads import (
    FIRST_PLAIN_TOKEN_ID,
    Workload,
    batches,
    capped_exponential_lengths,
    continuous_decode_steps,
    make_workload,
    padded_decode_tokens,
    random_prompts,
    ratio,
    static_decode_steps,
    tokens_per_s,
)


@pytest.mark.parametrize("cap", [32, 128, 512])
def test_capped_exponential_lengths_respect_the_cap(cap):
    lens = capped_exponential_lengths(5000, 128, cap, seed=1)
    assert len(lens) == 5000
    assert all(1 <= n <= cap for n in lens)
    assert max(lens) == cap  # a mean-128 exponential reaches every one of these caps


def test_capped_exponential_mean_matches_the_capped_distribution():
    # E[min(cap, ceil(X))] for X ~ Exp(mean): about mean * (1 - e^(-cap/mean)) + 0.5.
    for cap in (32, 128, 512):
        lens = capped_exponential_lengths(20000, 128, cap, seed=2)
        expected = 128 * (1 - math.exp(-cap / 128)) + 0.5
        assert sum(lens) / len(lens) == pytest.approx(expected, rel=0.04)


def test_uncapped_mean_is_the_requested_mean():
    lens = capped_exponential_lengths(20000, 50, 10**9, seed=3)
    assert sum(lens) / len(lens) == pytest.approx(50.5, rel=0.03)


def test_lengths_and_prompts_are_deterministic_by_seed():
    assert capped_exponential_lengths(100, 128, 512, 7) == capped_exponential_lengths(
        100, 128, 512, 7
    )
    assert capped_exponential_lengths(100, 128, 512, 7) != capped_exponential_lengths(
        100, 128, 512, 8
    )
    assert random_prompts(4, 16, 1000, 5) == random_prompts(4, 16, 1000, 5)
    assert random_prompts(4, 16, 1000, 5) != random_prompts(4, 16, 1000, 6)


def test_same_seed_different_caps_only_clip_the_same_draws():
    short = capped_exponential_lengths(500, 128, 32, 9)
    long = capped_exponential_lengths(500, 128, 512, 9)
    assert short == [min(32, n) for n in long]


def test_random_prompts_shape_and_vocabulary():
    prompts = random_prompts(8, 64, 49152, 0)
    assert len(prompts) == 8 and all(len(p) == 64 for p in prompts)
    assert all(FIRST_PLAIN_TOKEN_ID <= t < 49152 for p in prompts for t in p)
    assert len({tuple(p[:16]) for p in prompts}) == 8  # no shared first block


def test_bad_workload_parameters_are_rejected():
    with pytest.raises(ValueError):
        capped_exponential_lengths(10, 0, 32, 0)
    with pytest.raises(ValueError):
        capped_exponential_lengths(10, 128, 0, 0)
    with pytest.raises(ValueError):
        Workload("w", ((1, 2),), (1, 2))
    with pytest.raises(ValueError):
        batches([1, 2], 0)


def test_make_workload_counts_output_tokens():
    w = make_workload("cap32", [[1, 2], [3, 4], [5, 6]], 128, 32, 0)
    assert w.num_requests == 3
    assert w.output_tokens == sum(w.output_lens)
    assert all(n <= 32 for n in w.output_lens)


def test_padded_batches_run_to_their_longest_member():
    lens = [3, 10, 2, 5, 7]
    assert batches(lens, 2) == [[3, 10], [2, 5], [7]]
    assert padded_decode_tokens(lens, 2) == 10 * 2 + 5 * 2 + 7
    assert static_decode_steps(lens, 2) == 10 + 5 + 7


def test_continuous_steps_refill_freed_lanes():
    assert continuous_decode_steps([5], 4) == 5
    assert continuous_decode_steps([4, 4, 4, 4], 4) == 4
    # Lanes: [1, 4] -> step 1 frees a lane, the 3rd request starts at step 2 and ends at 4.
    assert continuous_decode_steps([1, 4, 3], 2) == 4
    assert static_decode_steps([1, 4, 3], 2) == 4 + 3
    # With every lane busy all the time, steps = tokens / lanes.
    assert continuous_decode_steps([2] * 8, 4) == 4


def test_continuous_never_takes_more_steps_than_static():
    for seed in range(5):
        lens = capped_exponential_lengths(64, 128, 512, seed)
        assert continuous_decode_steps(lens, 32) <= static_decode_steps(lens, 32)
        assert continuous_decode_steps(lens, 32) >= max(lens)


def test_throughput_arithmetic():
    assert tokens_per_s(1000, 4.0) == 250.0
    assert tokens_per_s(10, 0.0) == 0.0
    assert ratio(300.0, 100.0) == 3.0
    assert math.isnan(ratio(1.0, 0.0))


def test_offline_args_defaults_and_bad_values():
    from bench.offline import add_offline_args, build_plan, selected_experiments
    from engine.errors import InvalidRequestError

    parser = argparse.ArgumentParser()
    add_offline_args(parser)
    plan = build_plan(parser.parse_args([]), vocab_size=49152)
    assert plan.batch_size == 32 and plan.caps == (32, 128, 512)
    assert plan.settings.dtype == "bfloat16"
    assert all(w.num_requests == 64 and len(w.prompts[0]) == 128 for w in plan.workloads)
    assert plan.workloads[0].prompts == plan.workloads[-1].prompts  # same requests every cap
    quick = build_plan(parser.parse_args(["--quick", "--batch-size", "4"]), vocab_size=49152)
    assert quick.batch_size == 4 and quick.workloads[0].num_requests < 64
    assert selected_experiments("roofline,vs_hf") == ["vs_hf", "roofline"]
    for bad in (["--batch-size", "0"], ["--caps", "32,x"], ["--num-requests", "-1"]):
        with pytest.raises(InvalidRequestError):
            build_plan(parser.parse_args(bad), vocab_size=49152)
    with pytest.raises(InvalidRequestError):
        selected_experiments("roofline,nope")
