"""The TPOT governor (engine.tpot_governor) and the lanes it sets, from plain numbers."""

from __future__ import annotations

import pytest

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.tpot_governor import TpotGovernor


def step_ms(batch: int) -> float:
    return 80.0 + 7.0 * batch  # a CPU decode step: fixed cost plus a cost per stream


def test_lanes_settle_where_the_step_meets_the_target():
    gov = TpotGovernor(target_ms=150.0, max_lanes=64)
    batch = 64
    for _ in range(200):  # the batch follows the lanes, as the scheduler makes it
        batch = min(gov.observe(batch, step_ms(batch)), 64)
    assert step_ms(gov.lanes) <= 150.0 * 1.05
    assert step_ms(gov.lanes + 2) > 150.0 * 0.85  # not far below it either


def test_a_burst_is_let_in_as_the_steps_show_room():
    """A worker that has only seen light load does not hand a burst every lane at once: the
    lanes open one a step while steps stay under the target, and stop where they meet it."""
    gov = TpotGovernor(target_ms=150.0, max_lanes=64)
    assert gov.lanes <= 4
    opened = []
    for _ in range(30):  # a burst: every lane is taken as soon as it opens
        opened.append(gov.observe(gov.lanes, step_ms(gov.lanes)))
    assert opened == sorted(opened) and opened[-1] < 64  # grew, one at a time, and stopped
    assert step_ms(opened[-1]) <= 150.0


def test_lanes_grow_back_when_steps_get_fast():
    gov = TpotGovernor(target_ms=150.0, max_lanes=16, lanes=2)
    for _ in range(50):
        gov.observe(gov.lanes, 20.0)
    assert gov.lanes == 16


def test_a_target_must_be_positive():
    with pytest.raises(InvalidRequestError):
        TpotGovernor(target_ms=0.0, max_lanes=4)


def test_reservations_stop_when_the_lanes_are_taken():
    s = Scheduler(SchedulerConfig(num_blocks=64, block_size=4, max_num_seqs=8))
    s.lanes = 2
    seqs = [Sequence(f"r{i}", [1, 2, 3], SamplingParams()) for i in range(3)]
    assert s.reserve_remote(seqs[0], 3) and s.reserve_remote(seqs[1], 3)
    assert s.reserve_remote(seqs[2], 3) is None  # the KV is there; the lane is not
    s.abort("r0")
    assert s.reserve_remote(seqs[2], 3)
