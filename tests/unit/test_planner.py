"""The autoscaler's decisions from plain numbers: each rule of planner.policy, the capacity
model, the predictors and the configuration's errors."""

from __future__ import annotations

import re

import pytest

from engine.errors import InvalidRequestError
from planner import (
    AutoscaleConfig,
    Capacity,
    DecodeProfile,
    Observation,
    Planner,
    PoolLimits,
    PoolState,
    PrefillProfile,
)
from planner.predict import Load, Predictor

# one prefill worker: 1,000 prompt tokens/s; one decode step: 10 ms + 2 ms per sequence
PREFILL = PrefillProfile({256: 800.0, 1024: 1000.0})
DECODE = DecodeProfile({1: 0.012, 8: 0.026, 32: 0.074})
TTFT, TPOT = 1.0, 0.05  # targets: the decode batch within 50 ms is (50 - 10) / 2 = 20


def planner(**kw) -> Planner:
    base = {
        "ttft_target_s": TTFT,
        "tpot_target_s": TPOT,
        "cooldown_s": 30.0,
        "headroom": 1.0,
        "prefill": PoolLimits(1, 6),
        "decode": PoolLimits(1, 6),
        "predictor": "constant",
    }
    # fmt: skip
    return Planner(AutoscaleConfig(**{**base, **kw}), Capacity(PREFILL, DECODE))


def obs(t: float = 100.0, rate: float = 1.0, prompt: float = 500.0, output: float = 100.0,
        ttft: float | None = 0.3, tpot: float | None = 0.02, p: int = 1, d: int = 1,
        p_busy: float = 0.5, d_running: float = 5.0, kv: float = 0.2,
        scaling: bool = False) -> Observation:  # fmt: skip
    return Observation(
        t, Load(rate, prompt, output), ttft, tpot,
        PoolState(p, busy=p_busy), PoolState(d, running=d_running, kv_use=kv), scaling,
    )  # fmt: skip


def test_capacity_fits_the_profile_and_bounds_the_batch_by_tpot():
    fixed, per_seq = DECODE.fit()
    assert fixed == pytest.approx(0.010) and per_seq == pytest.approx(0.002)
    assert DECODE.max_batch(TPOT) == 20
    assert DECODE.max_batch(0.011) == 0  # not even one sequence fits
    assert PREFILL.capacity == 1000.0


def test_the_pool_whose_slo_breaks_grows_and_only_it():
    pl = planner()
    ttft_broken = pl.decide(obs(ttft=1.5))
    assert (ttft_broken.prefill, ttft_broken.decode) == (2, 1)
    assert "TTFT p90 1500 ms > target 1000 ms" in ttft_broken.reasons["prefill"]
    pl = planner()
    tpot_broken = pl.decide(obs(tpot=0.08, d_running=5.0))
    assert (tpot_broken.prefill, tpot_broken.decode) == (1, 2)
    assert "TPOT" in tpot_broken.reasons["decode"]


def test_predicted_load_sizes_each_pool_capped_per_decision():
    # 4 req/s x 500 prompt tokens = 2,000 tokens/s: 2 prefill workers of 1,000;
    # decoding at once: 4 x 100 tokens x 50 ms = 20 sequences = 1 decode worker of 20
    d = planner().decide(obs(rate=4.0))
    assert d.needed == {"prefill": 2, "decode": 1} and (d.prefill, d.decode) == (2, 1)
    # 12 req/s needs 6 prefill workers: one decision adds max_step (2) of them
    big = planner(max_step=2).decide(obs(rate=12.0, ttft=0.5))
    assert big.needed["prefill"] == 6 and big.prefill == 3
    # never past the pool's max
    capped = planner(prefill=PoolLimits(1, 2), max_step=4).decide(obs(rate=12.0, p=2))
    assert capped.prefill == 2 and "bound" in capped.reasons["prefill"]


def test_a_target_no_worker_can_hold_is_said_so_not_as_a_worker_count():
    # a TPOT target under one sequence's step (12 ms): a decode worker takes no load in it
    d = planner(tpot_target_s=0.011).decide(obs(tpot=None, d=6))  # no TPOT seen yet
    why = d.reasons["decode"]
    assert "no worker count holds the TPOT target" in why
    assert not re.search(r"\d{6,}", why)  # not "needs 1073741824 workers"
    assert d.decode == 6 and "bound" in why


def test_no_decision_while_a_previous_one_is_carried_out():
    d = planner().decide(obs(ttft=3.0, tpot=0.2, scaling=True))
    assert (d.prefill, d.decode, d.changed) == (1, 1, False)
    assert "still being carried out" in d.reasons["prefill"]


def test_cooldown_holds_a_pool_that_just_changed():
    pl = planner(cooldown_s=30.0)
    assert pl.decide(obs(t=100.0, ttft=1.5)).prefill == 2
    held = pl.decide(obs(t=110.0, ttft=1.5, p=2))  # still broken, 10 s later
    assert held.prefill == 2 and "cooldown" in held.reasons["prefill"]
    assert held.decode == 1  # the other pool is not held by it
    assert pl.decide(obs(t=131.0, ttft=1.5, p=2)).prefill == 3  # cooldown over


def test_scale_down_needs_room_in_the_slo_and_in_n_minus_1():
    # 3 prefill workers, light load (500 tokens/s), TTFT well under target: one goes
    pl = planner()
    light = obs(rate=1.0, ttft=0.2, p=3, p_busy=0.15)
    down = pl.decide(light)
    assert down.prefill == 2 and "2 workers can take the load" in down.reasons["prefill"]
    # the same, but TTFT only just under target: no shrink (hysteresis)
    assert planner().decide(obs(rate=1.0, ttft=0.8, p=3, p_busy=0.15)).prefill == 3
    # predicted load is light, but the live workers are busy: with N-1 they would be at
    # 0.7 x 3/2 = 1.05 of capacity, so N -> N-1 would breach: keep N
    busy = planner().decide(obs(rate=1.0, ttft=0.2, p=3, p_busy=0.7))
    assert busy.prefill == 3 and "holds" in busy.reasons["prefill"]


def test_decode_scale_down_checks_batch_and_kv_of_the_remaining_workers():
    def decide(running: float, kv: float = 0.3) -> int:
        # latency as the profile says for that batch; hysteresis out of the way (0.9)
        pl = planner(scale_down_below=0.9)
        return pl.decide(obs(rate=0.5, d=2, d_running=running, tpot=DECODE.step_at(running),
                             kv=kv)).decode  # fmt: skip

    assert decide(5.0) == 1  # each running 5 of a possible 20: one can go
    assert decide(12.0) == 2  # 24 on one worker would pass 20: its TPOT would break
    assert decide(5.0, kv=0.5) == 2  # KV at 0.5 each would be 1.0 on one worker
    assert decide(5.0, kv=0.95) == 3  # KV above 0.9 asks for another worker


def test_no_oscillation_between_n_and_n_minus_1_under_steady_load():
    """A steady load that 3 workers carry at busy 0.6 (2 would need 0.9 > headroom 0.8):
    the planner must not go 3 -> 2 -> 3 -> ... as Dynamo's users saw."""
    pl = planner(headroom=0.8, cooldown_s=0.0)
    n, history = 3, []
    for step in range(20):
        busy = 1.8 / n  # the same work spread over n workers
        ttft = 0.2 if busy <= 0.8 else 1.5  # TTFT breaks once a worker is over its headroom
        d = pl.decide(obs(t=10.0 * step, rate=2.4, prompt=500.0, ttft=ttft, p=n, p_busy=busy))
        n = d.prefill
        history.append(n)
    assert history == [3] * 20


def test_predictors():
    const = Predictor("constant")
    for rate in (1.0, 5.0, 2.0):
        const.observe(Load(rate, 100.0, 50.0))
    assert const.predict().rate == 2.0
    ewma = Predictor("ewma", alpha=0.5)
    for rate in (4.0, 0.0):
        ewma.observe(Load(rate, 100.0, 50.0))
    assert ewma.predict().rate == 2.0
    assert ewma.predict().prompt_tokens == 100.0  # an idle interval's lengths are not zeros
    assert ewma.predict_with(Load(8.0, 100.0, 50.0)).rate == 8.0  # a jump up counts at once


def test_live_figures_correct_the_profile():
    cap = Capacity(PREFILL, DECODE)
    # 1 worker, 500 tokens/s of load: the profile predicts busy 0.5; measured 0.9 -> 1.8x slower
    cap.correct_prefill(500.0, 1, 0.9)
    assert cap.prefill_tokens_per_s() == pytest.approx(1000.0 / 1.8)
    cap.correct_prefill(900.0, 1, 1.0)  # saturated: says nothing of its speed
    assert cap.prefill_tokens_per_s() == pytest.approx(1000.0 / 1.8)
    cap.correct_decode(0.036, 8.0)  # profile: 26 ms at batch 8; measured 36 ms
    assert cap.decode_factor == pytest.approx(0.036 / 0.026)
    assert cap.decode_batch(TPOT) < DECODE.max_batch(TPOT)
    cap.correct_prefill(10.0, 1, 0.9)  # absurd readings stay clamped
    assert cap.prefill_factor <= 4.0


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"prefill": PoolLimits(3, 2)}, "prefill: min workers (3) above max (2)"),
        ({"decode": PoolLimits(0, 2)}, "decode: min workers must be at least 1"),
        ({"ttft_target_s": 0.0}, "the TTFT target must be a number above 0"),
        ({"tpot_target_s": -1.0}, "the TPOT target must be a number above 0"),
        ({"percentile": 42.0}, "SLO percentile must be one of 50, 90, 95, 99"),
        ({"predictor": "arima"}, "unknown load predictor 'arima'"),
    ],
)
def test_bad_config_is_a_one_line_error(kw, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)) as err:
        AutoscaleConfig(**kw)
    assert "\n" not in str(err.value)


def test_a_ttft_broken_by_waiting_for_kv_room_grows_decode_not_prefill():
    pl = planner()
    waiting = obs(ttft=1.6, tpot=0.02)
    waiting = Observation(**{**{f: getattr(waiting, f) for f in waiting.__slots__},
                             "reservation_s": 1.2})  # fmt: skip
    d = pl.decide(waiting)
    assert (d.prefill, d.decode) == (1, 2)
    assert "waiting for KV room" in d.reasons["decode"]
    # the same TTFT spent in prefill (little reservation wait) grows prefill instead
    spent = Observation(**{**{f: getattr(waiting, f) for f in waiting.__slots__},
                           "reservation_s": 0.05})  # fmt: skip
    d = planner().decide(spent)
    assert (d.prefill, d.decode) == (2, 1)


def test_one_quiet_interval_is_not_a_trend():
    """2 prefill workers carry 1,500 tokens/s (busy 0.75 each; one alone would be at 1.5):
    a single quiet interval (a Poisson dip) must not take one away; a quiet window does."""
    pl = planner(headroom=0.8, cooldown_s=0.0, window_s=30.0, interval_s=10.0)  # lookback 6
    for t in (0.0, 10.0):
        assert pl.decide(obs(t=t, rate=3.0, ttft=0.4, p=2, p_busy=0.75)).prefill == 2
    dip = pl.decide(obs(t=20.0, rate=0.4, ttft=0.2, p=2, p_busy=0.1))
    assert dip.prefill == 2, dip.reasons["prefill"]
    quiet = [pl.decide(obs(t=30.0 + 10 * i, rate=0.4, ttft=0.2, p=2, p_busy=0.1)) for i in range(5)]
    # the busy intervals (t = 0, 10) leave the lookback of two windows (60 s) at t = 70
    assert [d.prefill for d in quiet] == [2, 2, 2, 2, 1]
