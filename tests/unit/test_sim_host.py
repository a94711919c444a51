"""bench.sim_host: logged steps grouped by how many other workers stepped beside them."""

from __future__ import annotations

import json

import pytest

from bench import sim_host
from sim.cost import FittedCost


def _write(path, steps):
    path.write_text("".join(json.dumps(s) + "\n" for s in steps))


def test_steps_are_grouped_by_the_workers_stepping_beside_them(tmp_path):
    """A decodes 0.1 s steps for 3 s; B steps beside its second second, C beside its third:
    A's steps are counted alone, beside one and beside two, each timed against the model
    alone, with the host factor the simulator would give."""
    cost = FittedCost({"fixed": 0.1}, 1, host_share=1.2)
    a = [[0, 0.0, 1, 10, 0.1 * i, 0.1 * (1.0 if i < 10 else 1.3 if i < 20 else 1.9)]
         for i in range(30)]  # fmt: skip
    t, a_timed = 0.0, []
    for s in a:  # back to back: each starts where the last ended
        a_timed.append([*s[:4], t, s[5]])
        t += s[5]
    one_at, two_at = a_timed[10][4], a_timed[20][4]
    b = [[0, 0.0, 1, 10, one_at, t - one_at + 1.0]]  # beside A from its 11th step on
    c = [[64, 2000.0, 0, 0, two_at, t - two_at + 1.0]]  # a prompt, from A's 21st step on
    _write(tmp_path / "steps-a.jsonl", a_timed)
    _write(tmp_path / "steps-b.jsonl", b)
    _write(tmp_path / "steps-c.jsonl", c)
    groups = sim_host.by_neighbours(cost, tmp_path, [])
    alone, one, two = (groups[("decode", k, 0)] for k in (0, 1, 2))
    # A's steps come first; B's one long step is beside A (and C from its middle on)
    assert len(alone) == 10 and len(one) == 11 and len(two) == 10
    assert [r for r, _ in alone] == pytest.approx([1.0] * 10)
    assert [r for r, _ in one[:10]] == pytest.approx([1.3] * 10)
    assert [r for r, _ in two] == pytest.approx([1.9] * 10)
    assert [s for _, s in one] == pytest.approx([1.2] * 11)
    assert [s for _, s in two] == pytest.approx([cost.host_factor(3, 1)] * 10)
    assert groups[("prefill", 2, 0)] == [(pytest.approx(29.0), cost.host_factor(3, 0))]
    late = sim_host.by_neighbours(cost, tmp_path, [one_at - a_timed[0][4]])
    assert ("decode", 0, 0) in late and ("decode", 1, 1) in late  # split into phases


def test_processes_are_told_apart_by_their_command_lines():
    assert sim_host.group("python -m splitserve serve --port 1", 1) == "router"
    assert sim_host.group("ray::DecodeWorker.step", 2) == "DecodeWorker"
    assert sim_host.group("ray::IDLE", 3) == "other Ray actors"
    assert sim_host.group("/x/ray/core/src/ray/raylet/raylet --x", 4) == "Ray's own processes"


def test_decode_steps_are_grouped_by_their_batch_and_the_batch_beside_them(tmp_path):
    """A steps 4 sequences 1.25x slower beside B's 32; its steps after B stops are alone
    and not counted; B's own steps are beside A's 4."""
    cost = FittedCost({"fixed": 0.1}, 1)
    a = [[0, 0.0, 4, 40, 0.125 * i, 0.125] for i in range(8)]  # 1 s beside B
    a += [[0, 0.0, 4, 40, 1.0 + 0.1 * i, 0.1] for i in range(5)]  # then alone
    b = [[0, 0.0, 32, 320, 0.0, 0.5], [0, 0.0, 32, 320, 0.5, 0.5]]
    _write(tmp_path / "steps-a.jsonl", a)
    _write(tmp_path / "steps-b.jsonl", b)
    groups = sim_host.pairs(cost, tmp_path)
    assert sorted(groups) == [(4, 32), (32, 4)]
    assert groups[(4, 32)] == pytest.approx([1.25] * 8)
    assert groups[(32, 4)] == pytest.approx([5.0, 5.0])
