"""`splitserve bench sweep`'s arithmetic: goodput at 90% attainment and the choice of rates."""

import argparse

import pytest

from bench import sweep
from bench.sweep import Point, goodput_at, next_rate
from splitserve.cli import main


def test_goodput_interpolates_at_the_first_crossing():
    pts = [(0.5, 1.0), (1.0, 0.95), (1.5, 0.75), (2.0, 0.2)]
    value, kind = goodput_at(pts)
    assert kind == "exact"
    assert value == pytest.approx(1.0 + (0.95 - 0.9) / (0.95 - 0.75) * 0.5)  # 1.125


def test_goodput_uses_the_first_crossing_even_if_a_higher_rate_recovers():
    value, kind = goodput_at([(1.0, 0.95), (2.0, 0.5), (3.0, 0.92)])
    assert kind == "exact" and 1.0 < value < 2.0


def test_goodput_bounds():
    assert goodput_at([(0.5, 0.95), (1.0, 0.9)]) == (1.0, "at least")  # 90% attains it
    assert goodput_at([(1.0, 0.5), (0.5, 0.8)]) == (0.5, "below")
    assert sweep.format_goodput(1.0, "at least") == ">= 1.00"
    assert sweep.format_goodput(0.25, "below") == "< 0.25"
    with pytest.raises(ValueError):
        goodput_at([])


def _simulate(rates, capacity, stop_below=0.5):
    """The rates a sweep tries against a server that attains 100% up to `capacity`, then falls."""

    def attainment(rate):
        return 1.0 if rate <= capacity else max(0.0, 1.0 - (rate - capacity))

    done = []
    while (rate := next_rate(rates, done, stop_below)) is not None:
        done.append((rate, attainment(rate)))
        assert len(done) < 20
    return done


def test_rates_go_up_until_attainment_collapses():
    done = _simulate((0.5, 1.0, 1.5, 2.0, 3.0), capacity=1.2)
    assert [r for r, _ in done] == [0.5, 1.0, 1.5, 2.0]  # 2.0 attains 20% < 50%: stop
    assert goodput_at(done)[1] == "exact"


def test_rates_go_on_past_the_grid_while_attained():
    done = _simulate((0.5, 1.0), capacity=1.6)
    assert [r for r, _ in done] == [0.5, 1.0, 1.5, 2.25]  # 1.5 attains, 2.25 does not
    assert goodput_at(done)[1] == "exact"
    done = _simulate((0.5, 1.0), capacity=5)
    assert [r for r, _ in done] == [0.5, 1.0, 1.5, 2.25]  # at most two steps past the grid
    assert goodput_at(done) == (2.25, "at least")


def test_lowest_rate_missing_is_halved_until_bracketed():
    done = _simulate((1.0, 2.0), capacity=0.3)
    assert [r for r, _ in done] == [1.0, 0.5, 0.25]
    value, kind = goodput_at(done)
    assert kind == "exact" and 0.25 <= value < 0.5


def test_halving_is_bounded():
    done = _simulate((1.0, 2.0), capacity=0.01)
    assert [r for r, _ in done] == [1.0, 0.5, 0.25]
    assert goodput_at(done) == (0.25, "below")


def test_num_prompts_holds_the_rate_within_bounds():
    args = argparse.Namespace(seconds_per_rate=40, min_prompts=12, max_prompts=60)
    assert sweep.num_prompts(0.1, args) == 12
    assert sweep.num_prompts(0.5, args) == 20
    assert sweep.num_prompts(5.0, args) == 60


def test_goodput_table_ratios():
    def pts(*pairs):
        return [Point(r, a, {}, []) for r, a in pairs]

    results = {
        "disaggregated": {"prefill-heavy": pts((0.5, 1.0), (1.0, 0.9))},
        "colocated": {"prefill-heavy": pts((0.25, 0.95), (0.5, 0.85))},
    }
    w = sweep.WORKLOADS["prefill-heavy"]
    table = sweep.goodput_table(results, [w])
    row = table["prefill-heavy"]
    assert row["goodput"]["disaggregated"] == (1.0, "at least")
    colocated, kind = row["goodput"]["colocated"]
    assert kind == "exact" and colocated == pytest.approx(0.375)
    assert row["ratios"]["colocated"] == pytest.approx(1.0 / 0.375)
    assert "disaggregated / colocated = 2.67x" in sweep.format_table(table, [w])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workloads", "nope"], "unknown workload 'nope'"),
        (["--modes", "nope"], "unknown mode 'nope'"),
        (["--rates", "0", "1"], "--rates must be positive"),
        (["--min-prompts", "10", "--max-prompts", "5"], "--max-prompts >= --min-prompts"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert main(["bench", "sweep", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_each_rate_has_fresh_prompts_and_the_same_arrivals():
    args = argparse.Namespace(
        model="m", seed=0, seconds_per_rate=40, min_prompts=12, max_prompts=60,
        request_timeout=60.0, vocab_size=49152,
    )  # fmt: skip
    w = sweep.WORKLOADS["prefill-heavy"]
    a, b = (sweep._bench_args(w, rate, "http://x", args) for rate in (0.25, 0.4))
    assert a.seed != b.seed  # a prefix cache must not serve one rate's prompts to the next
    assert a.arrival_seed == b.arrival_seed == 0
    assert a.random_input_len == 512 and a.ignore_eos and a.goodput == ["ttft:5000", "tpot:125"]


def test_reanalyze_recomputes_attainment_under_other_slos(tmp_path):
    def req(tpot_s):  # 11 tokens: TTFT 0.1 s, then 10 more tokens at tpot_s each
        return {"success": True, "start": 0.0, "first_token_time": 0.1, "token_times": [0.1],
                "end": 0.1 + 10 * tpot_s, "output_tokens": 11}  # fmt: skip

    def point(rate, tpots):
        return {
            "rate": rate,
            "attainment": None,
            "summary": {},
            "requests": [req(t) for t in tpots],
        }

    w = sweep.WORKLOADS["prefill-heavy"]
    doc = {
        "workloads": {w.name: {"description": w.description, "bench": w.bench,
                               "slos_ms": {"ttft": 5000.0, "tpot": 125.0}, "rates": [1.0, 2.0]}},
        "points": {
            "disaggregated": {w.name: [point(1.0, [0.09] * 10), point(2.0, [0.11] * 10)]},
            "colocated": {w.name: [point(1.0, [0.09] * 9 + [0.2]), point(2.0, [0.2] * 10)]},
        },
    }  # fmt: skip
    path = tmp_path / "sweep.json"
    path.write_text(__import__("json").dumps(doc))
    # Saved SLOs (TPOT 125 ms): disaggregated meets them at both rates; colocated attains
    # 90% at 1 req/s and 0% at 2.
    lines = sweep.reanalyze(path, {}).splitlines()
    assert ">= 2.00" in lines[2] and "disaggregated / colocated = 2.00x" in lines[3]
    # TPOT 100 ms: disaggregated's 110 ms at 2 req/s now misses: 1.0 + 0.1 / 1.0 = 1.10.
    tight = sweep.reanalyze(path, {"tpot": 100.0})
    assert "TPOT <= 100 ms" in tight and "disaggregated / colocated = 1.10x" in tight
    with pytest.raises(sweep.InvalidRequestError, match="cannot read a sweep result"):
        sweep.reanalyze(tmp_path / "missing.json", {})
