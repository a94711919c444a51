"""`splitserve generate` from a shell: output on success, one line on bad input."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as QType
from tiny_model import make_tiny_checkpoint, write_tiny_gguf


def splitserve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "splitserve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=2)


def test_generate_prints_text(tiny):
    r = splitserve(
        "generate",
        "--model",
        str(tiny),
        "--prompt",
        "The quick brown fox",
        "--max-tokens",
        "8",
        "--threads",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "finish=length" in r.stderr


def _bad_quant_model(tmp: Path) -> Path:
    wide = make_tiny_checkpoint(tmp / "wide", hidden_size=256, intermediate_size=256, num_layers=1)
    return write_tiny_gguf(tmp / "wide-q5k.gguf", wide, QType.Q5_K)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("unknown model", "nosuch-model"),
        ("missing file", "does-not-exist.gguf"),
        ("unsupported quant", "Q5_K"),
        ("prompt too long", "context"),
        ("max tokens zero", "max_tokens"),
        ("negative temperature", "temperature"),
    ],
)
def test_bad_input_gives_one_line_error(case, needle, tiny, tmp_path):
    model, extra = str(tiny), []
    if case == "unknown model":
        model = "nosuch-model"
    elif case == "missing file":
        model = str(tmp_path / "does-not-exist.gguf")
    elif case == "unsupported quant":
        model = str(_bad_quant_model(tmp_path))
    elif case == "prompt too long":
        extra = ["--prompt", "hello " * 2000]
    elif case == "max tokens zero":
        extra = ["--max-tokens", "0"]
    else:
        extra = ["--temperature", "-1"]
    args = ["generate", "--model", model, "--threads", "1", "--prompt", "hi", *extra]
    r = splitserve(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle in lines[0]


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + (name,), sub
                yield from _subcommands(sub, path + (name,))


def test_every_command_prints_its_help(capsys):
    """A `%` in a help text breaks argparse's formatting: `--help` then ends in a traceback."""
    from splitserve.cli import build_parser

    commands = list(_subcommands(build_parser()))
    assert len(commands) > 10
    broken = []
    for path, sub in commands:
        try:
            sub.format_help()
        except (ValueError, TypeError, KeyError) as exc:
            broken.append(f"{' '.join(path)}: {exc!r}")
    assert not broken
