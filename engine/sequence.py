"""A request's state inside one engine: tokens, progress and KV blocks.

Progress is one counter pair: `num_computed_tokens` (KV in cache) against
`len(token_ids)`. Prefill, chunked prefill, prefix-cache hits, recompute after
preemption and KV arriving from a prefill worker are all the computed count
moving; a token is sampled whenever a step brings the two level.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.block_manager import BlockTable
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)prefill
    AWAITING_KV = "awaiting_kv"  # blocks reserved; KV computed elsewhere, not landed yet
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, stop token or stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"
    PREFILLED = "prefilled"  # prefill-only: first token sampled, KV held for hand-off


@dataclass(slots=True)
class Sequence:
    seq_id: str
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int = -1
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    prefill_only: bool = False
    num_preemptions: int = 0
    blocks: BlockTable = field(default_factory=BlockTable)

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
