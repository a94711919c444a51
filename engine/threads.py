"""Torch threads for a worker process, from its CPU share (read in one place)."""

from __future__ import annotations

import os

import torch

from engine.engine_config import EngineConfig


def set_threads(config: EngineConfig) -> None:
    """Torch threads from the actor's CPU share, so workers do not fight over cores."""
    n = config.num_threads or int(os.environ.get("SPLITSERVE_WORKER_THREADS", "0")) or 1
    torch.set_num_threads(max(1, n))
