"""splitserve's engine: model, paged KV cache, scheduler, sampler and the offline API.

`LLM` and `EngineConfig` import torch and the model code, so they load on first
use; the scheduler, block manager and errors stay importable without torch.
"""

from engine.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    PromptTooLongError,
    SplitServeError,
    UnsupportedModelError,
)
from engine.sampling_params import SamplingParams


def __getattr__(name: str):
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "EngineConfig":
        from engine.engine_config import EngineConfig

        return EngineConfig
    if name == "RequestOutput":
        from engine.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(name)


__all__ = [
    "LLM",
    "EngineConfig",
    "InvalidRequestError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "RequestOutput",
    "SamplingParams",
    "SplitServeError",
    "UnsupportedModelError",
]
