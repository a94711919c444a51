"""The quick-start answer: the real model, through the installed CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_generate_chat_answers_paris():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "splitserve",
            "generate",
            "--chat",
            "--max-tokens",
            "32",
            "--prompt",
            "What is the capital of France?",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
