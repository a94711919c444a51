"""The simulator's inputs: workloads, traces and cost models; bad ones are one-line errors."""

from __future__ import annotations

import json
import random

import pytest

from bench.autoscale_bench import arrivals
from engine.errors import InvalidRequestError
from sim import hardware
from sim.cost import FittedCost, RooflineCost, features, fit, fit_knee
from sim.workload import (
    diurnal_rate,
    diurnal_times,
    load_trace,
    parse_length,
    parse_phases,
    poisson_times,
)


def test_lengths_parse_and_bad_ones_say_what_is_wanted():
    rng = random.Random(0)
    assert parse_length("128")(rng) == 128
    assert all(64 <= parse_length("64-512")(rng) <= 512 for _ in range(100))
    draws = [parse_length("lognormal:1000:1")(rng) for _ in range(4000)]
    assert min(draws) >= 1 and 900 < sum(draws) / len(draws) < 1100
    for bad in ("0", "-3", "5-2", "lognormal:0:1", "x", ""):
        with pytest.raises(InvalidRequestError, match="want N, LO-HI or lognormal"):
            parse_length(bad)


def test_phases_and_the_benchmarks_arrivals_are_one_draw():
    """A real `bench autoscale` run and its simulation see the same arrival times."""
    phases = parse_phases("30:0.5,60:3,30:0.5")
    assert arrivals(phases, 7) == list(poisson_times(phases, 7))
    with pytest.raises(InvalidRequestError, match="SECONDS:REQ_PER_S"):
        parse_phases("30:fast")
    with pytest.raises(InvalidRequestError, match="seconds > 0"):
        parse_phases("0:1")


def test_a_diurnal_day_peaks_in_the_middle():
    day = 2400.0
    times = list(diurnal_times(10.0, day, trough=0.2, seed=1))
    night = sum(t < day / 8 or t > 7 * day / 8 for t in times)
    noon = sum(3 * day / 8 < t < 5 * day / 8 for t in times)
    assert noon > 2.5 * night
    assert diurnal_rate(day / 2, 10.0, day, 0.2) == pytest.approx(10.0)
    assert diurnal_rate(0.0, 10.0, day, 0.2) == pytest.approx(2.0)


def test_traces_load_and_bad_ones_are_one_line(tmp_path):
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"arrival_s": 2, "prompt_tokens": 10, "output_tokens": 3}\n'
                  '{"arrival_s": 1, "prompt_tokens": 5, "output_tokens": 1}\n')  # fmt: skip
    assert [r.arrival_s for r in load_trace(jl)] == [1.0, 2.0]
    csv = tmp_path / "t.csv"
    csv.write_text("arrival_s,prompt_tokens,output_tokens\n0.5,100,20\n")
    assert load_trace(csv)[0].prompt_tokens == 100
    empty = tmp_path / "empty.csv"
    empty.write_text("arrival_s,prompt_tokens,output_tokens\n")
    with pytest.raises(InvalidRequestError, match="has no requests"):
        load_trace(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival_s": 1}\n')
    with pytest.raises(InvalidRequestError, match="each row needs"):
        load_trace(bad)
    with pytest.raises(InvalidRequestError, match="cannot read trace"):
        load_trace(tmp_path / "missing.csv")


def test_the_fit_recovers_a_linear_step_cost():
    true = (0.03, 0.02, 4e-4, 2e-7, 6e-4, 3e-6)
    rows = []
    for pt, ds, ctx in ((32, 0, 0), (512, 0, 0), (2048, 0, 0), (0, 1, 64), (0, 32, 256),
                        (0, 64, 64), (256, 16, 128), (0, 8, 1024)):  # fmt: skip
        f = features(pt, pt * (pt + 1) / 2, ds, ds * ctx)
        rows.append((f, sum(a * b for a, b in zip(true, f, strict=True))))
    coef = fit(rows)
    assert list(coef.values()) == pytest.approx(true, rel=1e-3)


def test_the_fit_finds_the_batch_below_which_a_decode_step_costs_no_more():
    # 22 ms for up to 4 sequences, then 1.4 ms a sequence: a linear model without the knee
    # is 9% off at batch 1; the fit picks the knee, and is exact
    def step_s(ds: int, ctx: int) -> float:
        return 0.022 + 1.4e-3 * max(0, ds - 4) + 2e-6 * ds * ctx

    pts = [(ds, ctx) for ds in (1, 2, 3, 4, 8, 16, 32, 64) for ctx in (64, 256)]
    rows = [((0, 0.0, ds, ds * ctx), step_s(ds, ctx)) for ds, ctx in pts]
    coef, knee = fit_knee(rows)
    assert knee == 4
    assert coef["decode_seqs"] == pytest.approx(1.4e-3, rel=1e-3)
    cost = FittedCost(coef, num_blocks=100, decode_knee=knee)
    assert cost.step_s(0, 0, 1, 64) == pytest.approx(step_s(1, 64), rel=1e-3)
    linear = FittedCost(fit([(features(*f), dt) for f, dt in rows]), num_blocks=100)
    assert abs(linear.step_s(0, 0, 1, 64) / step_s(1, 64) - 1) > 0.05


def test_a_fitted_model_round_trips_and_bad_files_are_one_line(tmp_path):
    c = FittedCost({"fixed": 0.03, "prefill_tokens": 4e-4, "prefill_ctx": 0.0,
                    "decode_seqs": 5e-4, "decode_ctx": 1e-6}, num_blocks=1234,
                   decode_knee=4)  # fmt: skip
    path = tmp_path / "cost.json"
    path.write_text(json.dumps(c.to_json()))
    back = FittedCost.load(path)
    assert back.num_blocks == 1234 and back.decode_knee == 4
    assert back.step_s(10, 55, 9, 100) == c.step_s(10, 55, 9, 100) != c.step_s(10, 55, 4, 100)
    path.write_text("{}")
    with pytest.raises(InvalidRequestError, match="bad cost model"):
        FittedCost.load(path)


def test_the_gpu_model_is_memory_bound_in_decode_and_refuses_what_does_not_fit():
    h100, l70 = hardware.lookup_gpu("h100"), hardware.lookup_model("llama-3-70b")
    with pytest.raises(InvalidRequestError, match="does not fit on 1 x H100"):
        RooflineCost(h100, l70, tp=1)
    c = RooflineCost(h100, hardware.lookup_model("llama-3-8b"), tp=1)
    one, many = c.step_s(0, 0, 1, 1000), c.step_s(0, 0, 64, 64 * 1000)
    assert many < 3 * one  # weights read once a step, whatever the batch
    assert c.step_s(4096, 4096 * 4097 / 2, 0, 0) > 10 * one  # a long prompt: compute
    assert c.hops.kv_bytes_per_token == 131072  # 2 x 32 layers x 8 heads x 128 x 2 bytes
