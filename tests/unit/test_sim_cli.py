"""`splitserve sim` and `splitserve plan` as a user runs them: answers, and one-line errors."""

from __future__ import annotations

import json

import pytest

from splitserve.cli import main


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["sim", "--gpu", "b300", "--model", "llama-3-8b", "--rate", "1"], "unknown GPU"),
        (["sim", "--gpu", "h100", "--model", "gpt-5", "--rate", "1"], "unknown model"),
        (["sim", "--gpu", "h100", "--model", "llama-3-8b"], "give one workload"),
        (["sim", "--rate", "1"], "say what to simulate"),
        (
            ["sim", "--gpu", "h100", "--model", "llama-3-70b", "--tp", "1", "--rate", "1"],
            "does not fit",
        ),
        (
            ["sim", "--gpu", "h100", "--model", "llama-3-8b", "--rate", "1", "--tp", "3"],
            "--tp must be",
        ),
        (
            ["sim", "--gpu", "h100", "--model", "llama-3-8b", "--rate", "1", "--ttft-ms", "0"],
            "--ttft-ms must be above 0",
        ),
        (
            [
                "sim",
                "--gpu",
                "h100",
                "--model",
                "llama-3-8b",
                "--rate",
                "1",
                "--prompt-len",
                "many",
            ],
            "bad --prompt-len",
        ),
        (
            ["plan", "--gpu", "h100", "--model", "llama-3-8b", "--rate", "1", "--percentile", "42"],
            "--percentile must be",
        ),
    ],
)
def test_bad_input_is_one_line(argv, says, capsys):
    assert main(argv) == 2
    assert says in _err(capsys)


def test_an_empty_trace_is_one_line(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n")
    assert main(["sim", "--gpu", "h100", "--model", "llama-3-8b", "--trace", str(trace)]) == 2
    assert "has no requests" in _err(capsys)


def test_an_slo_no_configuration_meets_says_so(capsys):
    """A TTFT target below one prompt's compute: no count of workers can hold it."""
    argv = [
        "plan",
        "--gpu",
        "h100",
        "--model",
        "llama-3-70b",
        "--rate",
        "10",
        "--prompt-len",
        "4096",
        "--output-len",
        "64",
        "--ttft-ms",
        "5",
        "--requests",
        "60",
    ]
    assert main(argv) == 2
    assert "no configuration holds this SLO" in _err(capsys)


def test_sim_runs_a_gpu_fleet(tmp_path, capsys):
    out = tmp_path / "sim.json"
    argv = [
        "sim",
        "--gpu",
        "h100",
        "--model",
        "llama-3-8b",
        "--prefill",
        "2",
        "--decode",
        "2",
        "--rate",
        "20",
        "--duration",
        "20",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "on up to 4 GPU(s)" in text and "TTFT p50/p90/p99" in text
    summary = json.loads(out.read_text())["summary"]
    assert summary["failed"] == 0 and 300 < summary["requests"] < 500


def test_plan_picks_counts_and_compares_with_colocated(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = [
        "plan",
        "--gpu",
        "h100",
        "--model",
        "llama-3-8b",
        "--rate",
        "40",
        "--prompt-len",
        "1024",
        "--output-len",
        "128",
        "--ttft-ms",
        "500",
        "--tpot-ms",
        "40",
        "--requests",
        "150",
        "--pool",
        "2",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    plan = json.loads(out.read_text())
    caps, p = plan["capacities"], plan["plan"]
    assert caps["prefill"] > 0 and caps["decode"] > 0
    assert p["prefill"] == -(-40 // caps["prefill"]) and p["decode"] == -(-40 // caps["decode"])
    assert p["gpus_disaggregated"] == p["prefill"] + p["decode"]
    assert p["verified"]["holds"]
    assert "colocated" in capsys.readouterr().out
