"""Each engine step's features and time, appended to a file: what `splitserve bench sim-fit
--from-steps` fits the simulator's cost model to, measured inside the serving workers
(their threads, their neighbours on the host, their per-layer KV hooks).

On when SPLITSERVE_STEP_LOG names a directory: each process writes steps-<pid>.jsonl, one
line a step: [prompt tokens, their context sum, decode sequences, their context sum,
start (perf_counter s), seconds]. Off (the default) it costs one attribute test a step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

ENV = "SPLITSERVE_STEP_LOG"


class StepLog:
    def __init__(self, directory: str):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(  # noqa: SIM115 - open for the process's life
            Path(directory) / f"steps-{os.getpid()}.jsonl", "a", buffering=1
        )

    @staticmethod
    def from_env() -> StepLog | None:
        directory = os.environ.get(ENV)
        return StepLog(directory) if directory else None

    def record(self, features: tuple[int, float, int, int], start_s: float, seconds: float):
        self._file.write(json.dumps([*features, start_s, seconds]) + "\n")
