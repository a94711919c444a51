"""Bounded admission per pool: past the bound a request is refused at once (HTTP 429 with
Retry-After, gRPC RESOURCE_EXHAUSTED), so the requests already admitted keep their latency
and the router's memory stays bounded by the bound, not by the offered load.

    prefill pool: prompt tokens admitted and not yet prefilled + this prompt
                  <= queued_tokens_per_prefill x active workers
    decode pool:  requests waiting for KV room <= waiting_per_decode x workers, and
                  requests held (reserved or streaming) <= streams_per_decode x workers
    colocated:    requests held <= (streams_per_decode + waiting_per_decode) x workers

Pure: it reads plain numbers the router's fleet keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidRequestError, OverloadedError

DEFAULT_CONTEXT = 8192  # the engine's default max_model_len cap (engine.llm_engine)


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    queued_tokens_per_prefill: int = 8192  # about 4 prefill steps of 2048 tokens
    streams_per_decode: int = 64  # the decode batch bound (--max-num-seqs)
    waiting_per_decode: int = 16  # requests waiting for KV room, beyond the streams
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("queued_tokens_per_prefill", "streams_per_decode", "waiting_per_decode"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"admission limit {name} must be >= 1")


def default_queued_tokens(max_num_batched_tokens: int, max_model_len: int | None) -> int:
    """The prefill bound per worker: about 4 prefill steps, and never less than one prompt
    of the longest context (so a long prompt is not shut out by a few short ones)."""
    return max(4 * max_num_batched_tokens, max_model_len or DEFAULT_CONTEXT)


@dataclass(frozen=True, slots=True)
class PoolLoad:
    workers: int  # active workers in the pool
    held: int = 0  # requests routed to it and not ended
    queued_tokens: int = 0  # prefill: prompt tokens not yet prefilled
    waiting: int = 0  # decode: requests waiting for KV room


def check_prefill(limits: AdmissionLimits, load: PoolLoad, prompt_tokens: int) -> None:
    bound = limits.queued_tokens_per_prefill * load.workers
    # one prompt is always let into an empty queue, however long (it fits the context)
    if load.queued_tokens and load.queued_tokens + prompt_tokens > bound:
        raise OverloadedError(
            f"the prefill pool is full ({load.queued_tokens} prompt tokens queued on "
            f"{load.workers} worker(s)); retry later",
            limits.retry_after_s,
        )


def check_decode(limits: AdmissionLimits, load: PoolLoad) -> None:
    if load.waiting >= limits.waiting_per_decode * load.workers or load.held >= (
        (limits.streams_per_decode + limits.waiting_per_decode) * load.workers
    ):
        raise OverloadedError(
            f"the decode pool is full ({load.held} requests on {load.workers} worker(s), "
            f"{load.waiting} waiting for KV); retry later",
            limits.retry_after_s,
        )
