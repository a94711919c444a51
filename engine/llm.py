"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tqdm import tqdm

from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | Seq[int]
Message = dict[str, str]


class LLM:
    """Generate for a list of prompts with continuous (or static) batching.

    `LLM(model="smollm2-135m", dtype="float32", scheduling="continuous",
    max_num_seqs=64, block_size=16, ...)`: keyword arguments are `EngineConfig` fields.
    """

    def __init__(self, model: str = "smollm2-135m", **kwargs: Any):
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown LLM argument(s): {', '.join(unknown)}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        batch: list = (
            [prompts]
            if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
            else list(prompts)
        )
        encoded = [
            (p, self.tokenizer.encode(p)) if isinstance(p, str) else (None, list(p)) for p in batch
        ]
        return self._run(encoded, params, use_tqdm)

    def chat(
        self,
        conversations: Seq[Message] | Seq[Seq[Message]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        batch: list = (
            [conversations]
            if conversations and isinstance(conversations[0], dict)
            else list(conversations)
        )
        encoded = []
        for messages in batch:
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
            encoded.append((text, self.tokenizer.encode_chat(list(messages))))
        return self._run(encoded, params, use_tqdm)

    def _run(self, encoded, params, use_tqdm: bool) -> list[RequestOutput]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(encoded)
        if len(params) != len(encoded):
            raise ValueError("need one SamplingParams per prompt, or a single one")
        for _, ids in encoded:  # validate all before starting any
            self.engine.validate_prompt(ids)
        request_ids = []
        for (text, ids), p in zip(encoded, params, strict=True):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, ids, p, prompt=text)
            request_ids.append(rid)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), disable=not use_tqdm, desc="generate")
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[r] for r in request_ids]
