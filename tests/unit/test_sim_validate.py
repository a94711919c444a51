"""bench.sim_validate's figures over several real runs: each the median of the runs, with
their spread; the loads scaled to the machine's speed; the cost outside the steps fitted
apart for idle and busy arrivals; the host's slowdown fitted apart for a neighbour's
decode and prefill steps; a bad --repeats or --rate-scale is a one-line error
before anything starts."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from bench import sim_calibrate, sim_loads, sim_steps, sim_validate
from engine.errors import SplitServeError
from sim.cost import FittedCost


def _rows(ttft_s: float, n: int = 20) -> list[dict]:
    return [
        {"arrival": i * 0.1, "ttft_s": ttft_s, "tpot_s": 0.05, "end": i * 0.1 + 1, "error": None}
        for i in range(n)
    ]


def test_a_figure_is_the_median_of_the_runs_and_its_spread_is_max_minus_min():
    real, spread = sim_validate.median_summary([_rows(0.2), _rows(0.3), _rows(0.25)], (1.0, 0.1))
    assert real["ttft_p50_ms"] == pytest.approx(250.0)
    assert spread["ttft_p50_ms"] == pytest.approx((300 - 200) / 250)
    assert real["tpot_p50_ms"] == pytest.approx(50.0) and spread["tpot_p50_ms"] == 0.0
    one, none = sim_validate.median_summary([_rows(0.2)], (1.0, 0.1))
    assert one["ttft_p90_ms"] == pytest.approx(200.0) and none["ttft_p90_ms"] == 0.0


def test_repeats_below_one_is_refused_before_any_run():
    parser = argparse.ArgumentParser()
    sim_validate.add_args(parser)
    with pytest.raises(SplitServeError, match="--repeats must be >= 1"):
        sim_validate.run(parser.parse_args(["--repeats", "0"]))


def _cost(per_token_s: float) -> FittedCost:
    return FittedCost({"fixed": 0.01, "prefill_tokens": per_token_s}, num_blocks=1000)


def test_loads_are_scaled_down_on_a_machine_too_slow_for_their_rates():
    slow = _cost(0.0017)  # a 1,024-token prompt in ~1.8 s: prefill-heavy's 0.7 req/s overloads
    scale = sim_loads.auto_scale(slow)
    assert 0 < scale < 1
    loads = [sim_loads.prefill_load(p, slow) for p in sim_loads.WORKLOADS.values()]
    assert max(loads) > 1  # unscaled, a queue that only grows
    assert max(x * scale for x in loads) <= sim_loads.MAX_PREFILL_LOAD + 1e-9
    assert sim_loads.auto_scale(_cost(0.0001)) == 1.0  # a fast machine: the rates as written


def test_a_scaled_load_keeps_its_requests_and_spaces_out_their_arrivals():
    w = sim_loads.WORKLOADS["chat"]
    one, quarter = sim_loads.requests_of(w, 0), sim_loads.requests_of(w, 0, 0.25)
    assert len(one) == len(quarter) > 100
    assert [r.prompt_tokens for r in one] == [r.prompt_tokens for r in quarter]
    assert [4 * r.arrival_s for r in one] == pytest.approx([r.arrival_s for r in quarter])
    assert quarter[-1].arrival_s < w["seconds"] / 0.25


def test_the_calibration_ends_with_a_phase_that_fills_the_decode_batch_whatever_the_scale():
    cost = FittedCost({"fixed": 0.02, "decode_seqs": 1.3e-3, "decode_ctx": 2e-6}, num_blocks=1000)
    load = sim_loads.calibration_load(cost)
    assert load[:-1] == sim_loads.CALIBRATION
    last = load[-1]
    out = sim_loads.mean_prompt(last["output"])
    ctx = sim_loads.mean_prompt(last["prompt"]) + out / 2
    n = sim_loads.DECODE_STREAMS
    # Little: sequences in flight = arrival rate x time each decodes (its tokens x the step)
    in_flight = last["rate"] * out * cost.step_s(0, 0, n, round(n * ctx))
    assert in_flight == pytest.approx(n, rel=0.01)
    full, quarter = sim_loads.requests_of(load, 0), sim_loads.requests_of(load, 0, 0.25)
    tail = len(sim_loads.requests_of(load[-1:], len(load) - 1))
    assert [r.arrival_s - full[-tail].arrival_s for r in full[-tail:]] == pytest.approx(
        [r.arrival_s - quarter[-tail].arrival_s for r in quarter[-tail:]]
    )  # the decode phase keeps its rate when the rest is scaled down


@pytest.mark.parametrize("bad", ["0", "-1", "x", "11"])
def test_a_bad_rate_scale_is_refused_before_any_run(bad):
    parser = argparse.ArgumentParser()
    sim_validate.add_args(parser)
    with pytest.raises(SplitServeError, match="--rate-scale must be auto or a number"):
        sim_validate.run(parser.parse_args(["--rate-scale", bad, "--cost", "/no/such.json"]))


def test_the_cost_outside_the_steps_is_fitted_apart_for_idle_and_busy_arrivals():
    gaps = [(0.001, False)] * 12 + [(0.020, True)] * 15
    assert sim_calibrate.fixed_costs(gaps) == pytest.approx((0.001, 0.020))
    few_idle = [(0.001, False)] * 3 + [(0.020, True)] * 15  # too few to tell: the median
    assert sim_calibrate.fixed_costs(few_idle) == pytest.approx((0.020, 0.020))
    assert sim_calibrate.fixed_costs([(-0.01, False)] * 12 + [(0.02, True)] * 12)[0] == 0.0


def test_the_workers_steps_tell_a_neighbours_decode_from_its_prefill(tmp_path):
    """Two workers' step logs ([prompt tokens, their context, decoding sequences, their
    context, start, seconds]): A decodes throughout, 1.2 x slower while B decodes, 1.05 x
    while B prefills, as fast as its base cost while B is idle. The fit finds the base and
    both shares."""
    base = FittedCost({"fixed": 0.02, "prefill_tokens": 1e-3, "decode_seqs": 1e-3}, 1)
    a, b, t = [], [], 0.0
    while t < 30.0:  # A: batches 1..16; B decodes for 10 s, prefills for 10, then idles
        ds = 1 + len(a) % 16
        dt = base.step_s(0, 0, ds, 64 * ds) * (1.2 if t < 10 else 1.05 if t < 20 else 1.0)
        a.append([0, 0.0, ds, 64 * ds, t, dt])
        t += dt
    t = 0.0
    while t < 20.0:
        pt, ds = (0, 8) if t < 10 else (200 + 40 * (len(b) % 10), 0)
        dt = base.step_s(pt, pt * pt / 2, ds, 64 * ds) * 1.2  # beside A's decode
        b.append([pt, pt * pt / 2, ds, 64 * ds, t, dt])
        t += dt
    for name, steps in (("a", a), ("b", b)):
        (tmp_path / f"steps-{name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    fitted, share, on_prefill = sim_steps.fit_with_contention(sim_steps.logged_steps(tmp_path))
    assert share == pytest.approx(1.2, rel=0.01)
    assert on_prefill == pytest.approx(1.05, rel=0.01)
    assert fitted.step_s(0, 0, 4, 256) == pytest.approx(base.step_s(0, 0, 4, 256), rel=0.02)


def test_a_run_whose_engine_stepped_slower_than_calibrated_shows_its_drift(tmp_path):
    """The steps a validation run's workers logged, against the calibrated model: 10%
    slower alone, and beside the other worker's decode exactly host_share slower: the
    machine drifted 10% since the calibration (with the host's contention taken out)."""
    cost = FittedCost({"fixed": 0.02, "decode_seqs": 1e-3}, 1, host_share=1.3)
    a = [[0, 0.0, 4, 256, 10.0 + i, cost.step_s(0, 0, 4, 256) * 1.1] for i in range(9)]
    b = [[0, 0.0, 2, 128, 10.0 + i, 0.9] for i in range(0, 9, 3)]  # beside a's every third
    for i in range(0, 9, 3):
        a[i][5] = cost.step_s(0, 0, 4, 256) * 1.3 * 1.1
    (tmp_path / "steps-a.jsonl").write_text("".join(json.dumps(s) + "\n" for s in a))
    (tmp_path / "steps-b.jsonl").write_text("".join(json.dumps(s) + "\n" for s in b))
    drift = sim_calibrate.step_drift(cost, tmp_path)
    assert drift == pytest.approx(1.1, rel=0.01)
    assert sim_calibrate.step_drift(cost, tmp_path / "none") is None  # an older run: no steps
    row = {"workload": "chat", "mode": "colocated", "real": {}, "sim": {}, "error": {},
           "step_drift": [drift, None]}  # fmt: skip
    assert sim_validate.format_row(row).endswith("| +10% |")


def test_the_calibrated_model_scaled_by_the_runs_drift_steps_that_much_slower():
    cost = FittedCost({"fixed": 0.02, "decode_seqs": 1e-3, "prefill_tokens": 1e-4}, 1,
                      host_share=1.3)  # fmt: skip
    slower = sim_calibrate.drifted(cost, [1.08, None, 1.12])
    assert slower is not None and slower.host_share == cost.host_share
    for f in ((0, 0.0, 4, 256), (512, 0.0, 0, 0)):
        assert slower.step_s(*f) == pytest.approx(1.1 * cost.step_s(*f))
    assert sim_calibrate.drifted(cost, [None]) is None  # no run logged its steps
    row = {"workload": "chat", "mode": "colocated", "step_drift": [1.1],
           "error_drifted": {"ttft_p50_ms": 0.04, "tpot_p90_ms": -0.12}}  # fmt: skip
    table = sim_validate.format_drifted({"runs": [row, {"workload": "x", "mode": "y"}]})
    assert "| chat | colocated | x1.100 | +4% | - | - | -12% | - |" in table
    assert "largest error 12.0%" in table
    assert sim_validate.format_drifted({"runs": [{"workload": "x"}]}) == ""


def test_a_slowness_that_lasts_is_told_from_a_step_to_step_scatter():
    """Decode steps 20% slow or fast in stretches of 200 steps, against the same scatter
    drawn step by step: the first keeps its autocorrelation and its 100-step means vary as
    much as its steps; the second's means vary about a tenth as much."""
    cost = FittedCost({"fixed": 0.02, "decode_seqs": 1e-3}, 1)
    t0 = cost.step_s(0, 0, 4, 256)
    rng = random.Random(0)
    lasting = [1.2 if (i // 200) % 2 else 0.8 for i in range(2000)]
    scattered = [rng.choice((0.8, 1.2)) for _ in range(2000)]
    found = {}
    for name, factors in (("lasting", lasting), ("scattered", scattered)):
        rows = [sim_steps.Logged((0, 0.0, 4, 256), t0 * k) for k in factors]
        rows.append(sim_steps.Logged((128, 0.0, 0, 0), 5.0))  # a prefill step: not counted
        found[name] = sim_steps.persistence(cost, rows)
    assert found["lasting"]["lag10"] > 0.9 and found["lasting"]["window_cv"] > 0.15
    assert abs(found["scattered"]["lag1"]) < 0.1
    assert found["scattered"]["window_cv"] < 2 * found["scattered"]["independent_window_cv"]
    assert found["lasting"]["cv"] == pytest.approx(found["scattered"]["cv"], rel=0.05)
    assert sim_steps.persistence(cost, rows[:100]) is None  # too few steps
