"""What the HTTP and gRPC front ends need from the serving system behind them.

A front end validates and tokenizes, then iterates `backend.generate(...)`:
token deltas arrive as the workers produce them; leaving the iteration early
(client disconnect, stop string) aborts the request on every worker it touched.
`RayBackend` (router/pools.py) is the disaggregated system; `LocalBackend` runs
one engine in-process (tests of the front ends, and the simplest deployment).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any, Protocol

from engine.engine_loop import EngineLoop, TokenDelta, stream
from engine.errors import check_prompt
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from router.trace import Trace

LOCAL_WORKER = "local-0"


class Backend(Protocol):
    model_name: str
    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int

    def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[TokenDelta]: ...

    async def status(self) -> dict[str, Any]: ...

    async def healthy(self) -> bool: ...


def validate_prompt(backend: Backend, prompt_token_ids: Sequence[int]) -> None:
    """Raise InvalidRequestError / PromptTooLongError before any worker sees the request."""
    check_prompt(prompt_token_ids, backend.max_model_len, backend.vocab_size)


class LocalBackend:
    """One engine on a thread of this process."""

    def __init__(self, loop: EngineLoop, model_name: str):
        self.loop = loop
        self.model_name = model_name
        self.tokenizer = loop.engine.tokenizer
        self.max_model_len = loop.engine.max_model_len
        self.vocab_size = loop.engine.model_config.vocab_size

    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[TokenDelta]:
        trace = Trace(request_id, "colocated", engine=LOCAL_WORKER)
        trace.mark("routed", time.time())
        async with aclosing(stream(self.loop, request_id, prompt_token_ids, params)) as deltas:
            async for delta in deltas:
                trace.merge("w", delta.marks)
                delta.trace = trace
                yield delta

    async def status(self) -> dict[str, Any]:
        snapshot = await asyncio.wrap_future(self.loop.call(LLMEngine.snapshot))
        worker = {"name": LOCAL_WORKER, "role": "colocated", "state": "active", **snapshot}
        return {"model": self.model_name, "mode": "local", "workers": [worker]}

    async def healthy(self) -> bool:
        return self.loop.error is None

    def shutdown(self) -> None:
        self.loop.stop()
