"""Offline benchmark workloads and the arithmetic on their results (pure: no torch, no model).

A workload is fixed prompts of random token ids plus one requested output length
per request. Lengths follow Anyscale's continuous-batching method: draw from an
exponential with the given mean and cap it, `min(cap, ceil(Exponential(mean)))`,
and generate exactly that many tokens (EOS ignored).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

# Token ids below this are control tokens in the Llama-family vocabularies we serve.
FIRST_PLAIN_TOKEN_ID = 100


@dataclass(frozen=True, slots=True)
class Workload:
    """The same prompts and requested output lengths, given to every system compared."""

    name: str
    prompts: tuple[tuple[int, ...], ...]
    output_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.output_lens):
            raise ValueError("need one output length per prompt")
        if any(n <= 0 for n in self.output_lens):
            raise ValueError("output lengths must be positive")

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def capped_exponential_lengths(n: int, mean: float, cap: int, seed: int) -> list[int]:
    """`n` lengths `min(cap, ceil(Exponential(mean)))`, each >= 1, reproducible by `seed`."""
    if n < 0 or mean <= 0 or cap <= 0:
        raise ValueError("n must be >= 0, mean and cap positive")
    rng = random.Random(seed)
    return [max(1, min(cap, math.ceil(rng.expovariate(1.0 / mean)))) for _ in range(n)]


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`n` prompts of `length` uniformly random plain token ids (no shared prefixes)."""
    if length <= 0 or vocab_size <= FIRST_PLAIN_TOKEN_ID:
        raise ValueError("length must be positive and the vocabulary larger than the control ids")
    rng = random.Random(seed)
    return [
        [rng.randrange(FIRST_PLAIN_TOKEN_ID, vocab_size) for _ in range(length)] for _ in range(n)
    ]


def make_workload(
    name: str, prompts: Sequence[Sequence[int]], mean: float, cap: int, seed: int
) -> Workload:
    """Fixed `prompts` with capped-exponential output lengths (mean `mean`, cap `cap`)."""
    lens = capped_exponential_lengths(len(prompts), mean, cap, seed)
    return Workload(name, tuple(tuple(p) for p in prompts), tuple(lens))


def batches(items: Sequence, batch_size: int) -> list[list]:
    """Consecutive batches of `batch_size` (the last one may be shorter), in order."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    return [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def padded_decode_tokens(output_lens: Sequence[int], batch_size: int) -> int:
    """Token slots a padded batcher decodes: every batch runs to its longest member."""
    return sum(max(b) * len(b) for b in batches(output_lens, batch_size))


def static_decode_steps(output_lens: Sequence[int], batch_size: int) -> int:
    """Steps static batching takes: each batch lasts as long as its longest member."""
    return sum(max(b) for b in batches(output_lens, batch_size))


def continuous_decode_steps(output_lens: Sequence[int], max_num_seqs: int) -> int:
    """Steps continuous batching takes (FIFO, a freed lane refilled at the next step).

    One step produces one token for every running request; prefill is counted
    as the step that yields a request's first token.
    """
    if max_num_seqs <= 0:
        raise ValueError("max_num_seqs must be positive")
    pending = list(reversed(output_lens))
    running: list[int] = []  # tokens still to generate, per lane
    steps = 0
    while pending or running:
        while pending and len(running) < max_num_seqs:
            running.append(pending.pop())
        steps += 1
        running = [n - 1 for n in running if n > 1]
    return steps


def tokens_per_s(tokens: int, seconds: float) -> float:
    """Throughput; 0 when nothing was timed."""
    return tokens / seconds if seconds > 0 else 0.0


def ratio(numerator: float, denominator: float) -> float:
    """`numerator / denominator`, NaN when the denominator is 0 (shown as n/a)."""
    return numerator / denominator if denominator else math.nan
