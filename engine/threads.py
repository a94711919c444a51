"""Torch threads for a worker process, from its CPU share (read in one place)."""

from __future__ import annotations

import os

import torch

from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine


def set_threads(config: EngineConfig) -> None:
    """Torch threads from the actor's CPU share, so workers do not fight over cores."""
    n = config.num_threads or int(os.environ.get("SPLITSERVE_WORKER_THREADS", "0")) or 1
    torch.set_num_threads(max(1, n))


def engine_here(config: EngineConfig) -> LLMEngine:
    """Make an engine on the calling thread, with its threads set there too (OpenMP's thread
    count is per thread): what a worker's EngineLoop runs on its own thread."""
    set_threads(config)
    return LLMEngine(config)
