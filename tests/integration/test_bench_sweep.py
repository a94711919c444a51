"""`splitserve bench sweep` end to end on the tiny model: real `splitserve serve` subprocesses
(Ray, HTTP) in two modes, a short rate sweep, the goodput table, JSON and plots."""

from __future__ import annotations

import json

import pytest
from tiny_model import make_tiny_checkpoint
from tokenizers import Tokenizer

from splitserve.cli import main


@pytest.mark.timeout(300)
def test_sweep_two_modes_on_the_tiny_model(tmp_path, capsys):
    model = make_tiny_checkpoint(tmp_path / "tiny")
    vocab = Tokenizer.from_file(str(model / "tokenizer.json")).get_vocab_size()
    out = tmp_path / "sweep"
    argv = [
        "bench", "sweep", "--model", str(model), "--dtype", "float32",
        "--vocab-size", str(vocab), "--workloads", "decode-heavy",
        "--modes", "disaggregated", "colocated", "--rates", "4",
        "--seconds-per-rate", "1", "--min-prompts", "4", "--max-prompts", "4",
        "--request-timeout", "60", "--out-dir", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "disaggregated / colocated =" in printed
    doc = json.loads((out / "sweep.json").read_text())
    for mode in ("disaggregated", "colocated"):
        points = doc["points"][mode]["decode-heavy"]
        # The tiny model meets the SLOs at 4 req/s, so the sweep goes on past the grid.
        assert [p["rate"] for p in points] == [4.0, 6.0, 9.0]
        for p in points:
            s = p["summary"]
            assert (s["completed"], s["failed"]) == (4, 0), s["errors"]
            assert s["total_output_tokens"] == 4 * 64
            assert p["attainment"] == s["slo_attainment"]
        goodput = doc["goodput"]["decode-heavy"][mode]
        assert goodput["kind"] in ("exact", "at least")
    assert doc["goodput"]["decode-heavy"]["ratios"]["colocated"] > 0
    assert (out / "sweep_decode-heavy.png").stat().st_size > 0
