"""bench.sim_validate's figures over several real runs: each the median of the runs, with
their spread; a bad --repeats is a one-line error before anything starts."""

from __future__ import annotations

import argparse

import pytest

from bench import sim_validate
from engine.errors import SplitServeError


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
