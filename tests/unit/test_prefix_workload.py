"""`splitserve bench prefix` without a server: the workload builder, the cache plan, the flags."""

from __future__ import annotations

import pytest

from bench.prefix_bench import build_workload, plan_cache
from bench.workloads import FIRST_PLAIN_TOKEN_ID
from engine.errors import InvalidRequestError
from splitserve.cli import build_parser, main


def test_workload_prompts_are_exact_and_share_prefixes_within_groups_only():
    workload = build_workload(5, 40, 6, 23, vocab=400, seed=3)
    assert len(workload) == 23
    assert all(len(ids) == 46 for _, ids in workload)
    groups = [g for g, _ in workload]
    assert sorted(set(groups)) == [0, 1, 2, 3, 4]
    assert [groups.count(g) for g in range(5)] == [5, 5, 5, 4, 4]
    assert groups != sorted(groups)  # shuffled across groups
    prefix_of = {}
    for g, ids in workload:
        assert all(FIRST_PLAIN_TOKEN_ID <= t < 400 for t in ids)
        assert prefix_of.setdefault(g, ids[:40]) == ids[:40]
    prefixes = list(prefix_of.values())
    # Different across groups from the first token (so from the first KV block) on.
    assert len({p[0] for p in prefixes}) == 5
    assert len({tuple(ids) for _, ids in workload}) == 23  # every suffix unique
    assert build_workload(5, 40, 6, 23, vocab=400, seed=3) == workload  # seeded


FACTS = {"vocab": 400, "kv_bytes_per_token": 1024, "max_model_len": 512}


def _args(*argv: str):
    args = build_parser().parse_args(["bench", "prefix", "--block-size", "4", *argv])
    args.requests = args.requests or 4 * args.groups
    return args


def test_cache_plan_holds_half_the_groups_plus_one():
    plan = plan_cache(_args("--groups", "6", "--prefix-tokens", "120", "--suffix-tokens", "8",
                            "--concurrency", "2", "--max-tokens", "4"), FACTS)  # fmt: skip
    assert plan["blocks"] == 128 and plan["tokens"] == 512  # 4 prompts of 128 tokens
    assert plan["prompts_held"] == 4.0
    assert int(plan["kv_cache_gb"] * 2**30 // (4 * 1024)) == 128  # what the engine will size


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--groups", "6", "--prefix-tokens", "40"],
            "holds 7.1 prompts, all 6 groups: use --groups 8 or more",
        ),
        (["--groups", "6", "--prefix-tokens", "120", "--kv-cache-gb", "0.0001"], "max_model_len"),
        (["--groups", "6", "--prefix-tokens", "120", "--concurrency", "8"], "decode worker"),
        (["--groups", "400", "--prefix-tokens", "120"], "at most 300"),
    ],
)
def test_cache_plan_refuses_sizes_that_defeat_the_bench(argv, message):
    with pytest.raises(InvalidRequestError, match=message):
        plan_cache(_args(*argv), FACTS)


@pytest.mark.parametrize(
    "argv",
    [["--groups", "1"], ["--prefix-tokens", "0"], ["--concurrency", "0"], ["--rounds", "0"],
     ["--groups", "6", "--requests", "5"], ["--request-rate", "0"], ["--kv-cache-gb", "-1"]],
)  # fmt: skip
def test_bad_flags_are_one_line_errors(argv, capsys):
    assert main(["bench", "prefix", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --") and err.count("\n") == 1
