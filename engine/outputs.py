"""What generation returns to callers: text, token ids, finish reason and timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.sampler import SampledToken


@dataclass(slots=True)
class RequestTimings:
    arrival_s: float  # time.perf_counter() values, like every field here
    first_token_s: float | None = None
    finished_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    scheduled_s: float | None = None  # first in a step (prefill, or decode once KV landed)
    landed_s: float | None = None  # a remote prefill's pages all in (decode worker)

    def wall_marks(self) -> dict[str, float]:
        """The marks set so far as wall-clock (time.time()) seconds, for a request's trace
        across processes (router.trace)."""
        offset = time.time() - time.perf_counter()
        marks = {
            "arrival": self.arrival_s,
            "scheduled": self.scheduled_s,
            "first_token": self.first_token_s,
            "landed": self.landed_s,
        }
        return {k: v + offset for k, v in marks.items() if v is not None}

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        n = len(self.token_times_s)
        if n < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (n - 1)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    logprobs: list[SampledToken] | None = None
    timings: RequestTimings = field(default_factory=lambda: RequestTimings(0.0))
    prompt: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
