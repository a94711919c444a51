"""Steps that scatter about the cost model over lasting stretches of slowness (sim.noise),
and the scatter read back off logged steps (bench.sim_steps.fit_noise)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest

from bench.sim_steps import Logged, fit_noise
from engine.errors import InvalidRequestError
from sim.cluster import ClusterConfig
from sim.cost import FittedCost
from sim.noise import NoiseTrack, StepNoise, averaged
from sim.simulate import simulate
from sim.workload import generate, parse_length, poisson_times

COST = FittedCost({"fixed": 0.02, "decode_seqs": 1e-3, "prefill_tokens": 1e-3}, 4000)


def _corr(xs: list[float], lag: int) -> float:
    m, v = statistics.fmean(xs), statistics.pvariance(xs)
    return statistics.fmean((a - m) * (b - m) for a, b in zip(xs, xs[lag:], strict=False)) / v


def test_a_workers_slowness_has_mean_one_and_lasts_as_its_tau():
    """Steps of 20 ms over 10 min: the factor's mean is 1 (the model's mean time kept);
    its log has the components' spread, correlated e^-1 one tau (0.5 s) on, and a step's
    own white draw adds spread but no correlation."""
    track = NoiseTrack(StepNoise(0.0, ((0.2, 0.5),)), seed=3)
    lasting = [math.log(track.factor(i * 0.02, 0.02)) for i in range(30_000)]
    assert statistics.fmean(math.exp(x) for x in lasting) == pytest.approx(1.0, abs=0.03)
    assert statistics.pstdev(lasting) == pytest.approx(0.2, rel=0.15)
    assert _corr(lasting, 25) == pytest.approx(math.exp(-1), abs=0.1)
    white = NoiseTrack(StepNoise(0.2), seed=3)
    xs = [math.log(white.factor(i * 0.02, 0.02)) for i in range(30_000)]
    assert statistics.pstdev(xs) == pytest.approx(0.2, rel=0.05)
    assert abs(_corr(xs, 1)) < 0.05
    # exp(x) of x ~ N(0, 0.2^2) has mean 1.02: the factor is shifted to keep it 1
    assert statistics.fmean(math.exp(x) for x in xs) == pytest.approx(1.0, abs=0.006)


def test_the_slowness_is_one_function_of_time_however_it_is_asked():
    """Asked out of order (a run of steps cut short and booked again), the lasting parts
    are what a track asked in order gives at the same instants."""
    noise = StepNoise(0.0, ((0.1, 0.05), (0.1, 2.0)))
    times = [0.5 * i for i in range(100)]
    ordered = [NoiseTrack(noise, 7).factor(t, 0.03) for t in times]
    shuffled = NoiseTrack(noise, 7)
    late_first = {t: shuffled.factor(t, 0.03) for t in reversed(times)}
    assert [late_first[t] for t in times] == pytest.approx(ordered)


def test_a_long_step_averages_out_the_short_stretches():
    noise = StepNoise(0.0, ((0.2, 0.05),))
    track = NoiseTrack(noise, 1)
    short = [math.log(track.factor(i * 2.0, 0.01)) for i in range(2000)]
    long = [math.log(track.factor(i * 2.0 + 1.0, 1.0)) for i in range(2000)]
    assert statistics.pstdev(short) == pytest.approx(0.2, rel=0.1)
    expected = 0.2 * math.sqrt(averaged(0.05, 1.0))  # ~0.06
    assert statistics.pstdev(long) == pytest.approx(expected, rel=0.2)
    assert statistics.fmean(math.exp(x) for x in long) == pytest.approx(1.0, abs=0.01)


def _logged(noise: StepNoise, seconds: float = 600.0) -> list[Logged]:
    """One worker's steps timed by COST x its slowness: 4-sequence decode steps, and a
    512-token prefill step every 5 s."""
    track, rows, t = NoiseTrack(noise, 11), [], 0.0
    while t < seconds:
        f = (512, 0.0, 0, 0) if int(t / 5) > int((t - 0.03) / 5) else (0, 0.0, 4, 256)
        span = COST.step_s(*f)
        dt = span * track.factor(t, span, prefill=bool(f[0]))
        rows.append(Logged(f, dt, 0.0, 0.0, start=t))
        t += dt
    return rows


def test_the_fit_reads_back_the_scatter_that_made_the_steps():
    made = StepNoise(0.05, ((0.1, 0.3), (0.08, 10.0)), prefill_white=0.15)
    found = fit_noise(COST, _logged(made, 1200.0))
    assert found is not None
    assert found.white == pytest.approx(0.05, abs=0.02)
    lasting = sum(sd * sd for sd, _ in found.components)
    assert lasting == pytest.approx(0.1**2 + 0.08**2, rel=0.3)
    slow = sum(sd * sd for sd, tau in found.components if tau >= 2.0)
    assert slow == pytest.approx(0.08**2, rel=0.5)  # the stretch of ~10 s told apart
    assert found.prefill_white == pytest.approx(0.15, abs=0.04)
    assert fit_noise(COST, _logged(made, 5.0)) is None  # too few steps


def test_scattered_steps_widen_the_tpot_tail_and_keep_its_middle():
    """The same workload on one colocated worker: a slowness lasting ~2 s (a request's
    life) makes its TPOTs spread; their median moves little."""
    times = poisson_times([(300.0, 2.0)], 0)
    reqs = list(generate(times, parse_length("64-256"), parse_length("32-64"), 0))
    cfg = ClusterConfig(mode="colocated", prefill=1, decode=0)
    flat = simulate(COST, cfg, reqs, 10.0, 1.0).records
    scattered_cost = dataclasses.replace(COST, noise=StepNoise(0.02, ((0.15, 2.0),)))
    scattered = simulate(scattered_cost, cfg, reqs, 10.0, 1.0).records

    def spread(records) -> tuple[float, float]:
        tpots = sorted(r.tpot_s for r in records if r.tpot_s)
        p50, p90 = tpots[len(tpots) // 2], tpots[9 * len(tpots) // 10]
        return p50, p90 / p50

    (flat_p50, flat_spread), (p50, wide) = spread(flat), spread(scattered)
    assert p50 == pytest.approx(flat_p50, rel=0.05)
    assert wide > flat_spread + 0.1


def test_the_scatter_is_saved_with_the_cost_model_and_checked_on_load(tmp_path):
    noise = StepNoise(0.05, ((0.1, 0.3),), prefill_white=0.02)
    path = tmp_path / "cost.json"
    path.write_text(json.dumps(dataclasses.replace(COST, noise=noise).to_json()))
    assert FittedCost.load(path).noise == noise
    bad = dataclasses.replace(COST, noise=StepNoise(0.05, ((0.1, -1.0),))).to_json()
    path.write_text(json.dumps(bad))
    with pytest.raises(InvalidRequestError, match="tau > 0"):
        FittedCost.load(path)
