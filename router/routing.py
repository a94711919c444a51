"""Routing policy on plain numbers: which decode worker reserves KV, which prefill worker
computes the prompt. No Ray, no asyncio: the fleet hands in load snapshots, tests build them.

decode:  order by free KV blocks, minus a penalty per stream in flight (ties at random);
         the caller tries them in that order until one grants the reservation
prefill: `prefix` (default) picks the worker that finishes this prompt soonest:
             cost = uncached prompt tokens queued there + this prompt's uncached tokens
         so a prompt goes where its prefix is cached until that worker's queue grows by
         more than the prefix is worth; then a second worker takes (and caches) it too.
         `least-loaded`: power of two choices on queued tokens; `random`: uniform.
colocated: the worker with the fewest requests in flight (ties at random)
scale-down: starting workers leave first, then the active ones with the least in flight

The router's view of each prefill worker's prefix cache is a `PrefixIndex`: the
chained block hashes it sent there, LRU-bounded by that worker's KV capacity.
"""

from __future__ import annotations

import enum
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from engine.block_manager import chain_hash

IN_FLIGHT_BLOCKS = 8  # a stream in flight counts as this many blocks it will still want


class PrefillPolicy(enum.Enum):
    PREFIX = "prefix"
    LEAST_LOADED = "least-loaded"
    RANDOM = "random"


@dataclass(frozen=True, slots=True)
class DecodeLoad:
    name: str
    free_blocks: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class PrefillLoad:
    name: str
    queued_tokens: int
    cached_tokens: int = 0  # of this prompt, per the router's PrefixIndex


def decode_order(workers: Sequence[DecodeLoad], rng: random.Random) -> list[str]:
    """Most free KV first, penalised by streams in flight; ties broken at random."""
    keyed = [
        (-w.free_blocks + IN_FLIGHT_BLOCKS * w.in_flight, rng.random(), w.name) for w in workers
    ]
    return [name for _, _, name in sorted(keyed)]


def pick_prefill(
    workers: Sequence[PrefillLoad],
    prompt_tokens: int,
    policy: PrefillPolicy,
    rng: random.Random,
) -> str:
    if not workers:
        raise ValueError("no prefill worker to pick from")
    if policy is PrefillPolicy.RANDOM or len(workers) == 1:
        return rng.choice(workers).name
    if policy is PrefillPolicy.LEAST_LOADED:
        a, b = rng.sample(list(workers), 2)
        return a.name if a.queued_tokens <= b.queued_tokens else b.name
    keyed = [
        (
            w.queued_tokens + prompt_tokens - min(w.cached_tokens, prompt_tokens),
            rng.random(),
            w.name,
        )
        for w in workers
    ]
    return min(keyed)[2]


def pick_colocated(in_flight: Sequence[tuple[str, int]], rng: random.Random) -> str:
    """(name, requests in flight) -> the least busy worker, ties broken at random."""
    if not in_flight:
        raise ValueError("no worker to pick from")
    return min((n, rng.random(), name) for name, n in in_flight)[2]


def leaving_order(members: Sequence[tuple[str, bool, int]]) -> list[str]:
    """Who leaves a shrinking pool first, from (name, starting, requests in flight) in spawn
    order: starting ones (no load yet), newest first; then the active ones with the least
    in flight, newest first on ties."""
    newest = list(members)[::-1]
    starting = [name for name, is_starting, _ in newest if is_starting]
    active = sorted((m for m in newest if not m[1]), key=lambda m: m[2])
    return starting + [name for name, _, _ in active]


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hash of every full block of a prompt, as the engine's prefix cache keys it."""
    hashes: list[int] = []
    prev: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = chain_hash(prev, token_ids[start : start + block_size])
        hashes.append(prev)
    return hashes


class PrefixIndex:
    """Which prompt blocks each prefill worker has seen, LRU-bounded by its KV capacity."""

    def __init__(self) -> None:
        self._blocks: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}

    def add_worker(self, name: str, capacity_blocks: int) -> None:
        self._blocks[name] = OrderedDict()
        self._capacity[name] = max(1, capacity_blocks)

    def workers(self) -> set[str]:
        return set(self._blocks)

    def remove_worker(self, name: str) -> None:
        self._blocks.pop(name, None)
        self._capacity.pop(name, None)

    def cached_blocks(self, name: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of the prompt the worker is believed to hold."""
        held = self._blocks.get(name)
        if held is None:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def record(self, name: str, hashes: Sequence[int]) -> None:
        held = self._blocks.get(name)
        if held is None:
            return
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self._capacity[name]:
            held.popitem(last=False)
