"""Iteration-level scheduler: which sequences compute how many tokens this step.

Pure Python: no torch, Ray or asyncio. It owns the block pool and returns one
`SchedulerOutput` per step; the model runner executes it, then the engine
reports back with `step_done` and `finish`.

    add() ──> WAITING ──admit──> RUNNING ──finish──> FINISHED (blocks freed)
                 ^                  │
                 └────preempt───────┘   (blocks freed, KV recomputed later)
    reserve_remote() ──> AWAITING_KV ──kv_landed──> landed ──a free lane──> RUNNING  (decode)
    prefill_only: RUNNING ──first token──> FINISHED(PREFILLED), blocks held until release()

Policies:
- continuous: every step, running sequences go first (one token each for
  decodes, a chunk for unfinished prefills), then waiting ones are admitted
  while the token budget, `max_num_seqs` and free blocks allow. When a running
  sequence needs a block and none is free, the youngest running sequence is
  preempted (recompute).
- static: admit a batch of up to `max_num_seqs`, run it until every member has
  finished, then admit the next batch. As in a real static batch, a finished
  member keeps its lane: it holds its blocks and computes a pad token every
  step until the batch ends. Kept only as the benchmark baseline.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockAllocator, KVCacheManager
from engine.sequence import FinishReason, Sequence, SequenceStatus


class SchedulingPolicy(enum.Enum):
    CONTINUOUS = "continuous"
    STATIC = "static"


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    policy: SchedulingPolicy = SchedulingPolicy.CONTINUOUS
    max_model_len: int = 1 << 30  # static pad lanes stop growing here
    enable_prefix_caching: bool = True
    # False: a prompt is admitted only when all of it fits this step's budget
    # (prompts longer than the whole budget are still chunked, alone).
    chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # position of the first token computed this step
    num_tokens: int
    pad: bool = False  # a finished static-batch member's lane: computed, never sampled
    # Whether this chunk reaches the end of the sequence, so a token is sampled.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = not self.pad and self.start + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    def features(self) -> tuple[int, float, int, int]:
        """What a step's time depends on: (prompt tokens computed, the sum over them of the
        context each attends to, sequences decoding, the sum of their lengths). A chunk at
        or past the prompt's end computes a generated token's KV: a decode."""
        pt, pc, ds, dc = 0, 0.0, 0, 0
        for c in self.chunks:
            if c.start >= c.seq.num_prompt_tokens:
                ds += c.num_tokens
                dc += c.start + c.num_tokens
            else:
                pt += c.num_tokens
                pc += c.num_tokens * c.start + c.num_tokens * (c.num_tokens + 1) / 2
        return pt, pc, ds, dc


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.allocator = BlockAllocator(
            config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.kv = KVCacheManager(self.allocator)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.awaiting_kv: dict[str, Sequence] = {}
        self.landed: deque[Sequence] = deque()  # KV in, waiting for a lane (max_num_seqs)
        self.lanes = config.max_num_seqs  # decode lanes to hand out (a TPOT governor lowers it)
        self.held: dict[str, Sequence] = {}  # prefill-only, finished, KV not yet released
        self.padding: list[Sequence] = []  # static: finished members still in the batch
        self.prefix_hit_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache

    # ---- requests in and out -------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.landed)

    def abort(self, seq_id: str) -> Sequence | None:
        for seq in [*self.running, *self.waiting, *self.landed, *self.awaiting_kv.values()]:
            if seq.seq_id == seq_id:
                self.finish(seq, FinishReason.ABORT)
                return seq
        held = self.held.get(seq_id)
        if held is not None:
            self.release(held)
        return held

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        static = self.config.policy is SchedulingPolicy.STATIC
        if seq in self.running:
            self.running.remove(seq)
            if static and reason in (FinishReason.STOP, FinishReason.LENGTH):
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
                self.padding.append(seq)  # keeps its lane until the batch ends
                return self._end_static_batch_if_done()
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.landed:
            self.landed.remove(seq)
        self.awaiting_kv.pop(seq.seq_id, None)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if reason is FinishReason.PREFILLED:
            self.held[seq.seq_id] = seq
        else:
            self.kv.release(seq.blocks)
        if static:
            self._end_static_batch_if_done()

    def _end_static_batch_if_done(self) -> None:
        if not self.running:
            for seq in self.padding:
                self.kv.release(seq.blocks)
            self.padding.clear()

    def release(self, seq: Sequence) -> None:
        """Free the KV a prefill-only sequence held for hand-off."""
        self.held.pop(seq.seq_id, None)
        self.kv.release(seq.blocks)

    # ---- KV computed elsewhere (decode worker) -------------------------------
    def reserve_remote(self, seq: Sequence, num_tokens: int) -> list[int] | None:
        """Reserve blocks for `num_tokens` tokens of KV that will arrive from a peer. None
        when the blocks are not there, or every lane is taken: a reservation is a lane, so a
        request waits before its prefill, never between its first and second tokens."""
        held = len(self.running) + len(self.landed) + len(self.awaiting_kv)
        if held >= min(self.lanes, self.config.max_num_seqs):
            return None
        if not self.kv.can_grow(seq.blocks, num_tokens):
            return None
        self.kv.grow(seq.blocks, num_tokens)
        seq.status = SequenceStatus.AWAITING_KV
        self.awaiting_kv[seq.seq_id] = seq
        return list(seq.blocks.block_ids)

    def kv_landed(self, seq_id: str, num_computed_tokens: int) -> Sequence:
        """All pages arrived: the computed count jumps; the sequence joins the batch at the
        next step that has a lane for it (the batch never exceeds max_num_seqs)."""
        seq = self.awaiting_kv.pop(seq_id)
        seq.num_computed_tokens = num_computed_tokens
        self.kv.publish_full_blocks(seq.blocks, seq.token_ids, num_computed_tokens)
        seq.status = SequenceStatus.RUNNING
        self.landed.append(seq)
        return seq

    def _admit_landed(self) -> None:
        while self.landed and len(self.running) < self.config.max_num_seqs:  # lanes: reserve
            self.running.append(self.landed.popleft())

    # ---- one step ------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._admit_landed()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if out.preempted:
            return out
        static = self.config.policy is SchedulingPolicy.STATIC
        if static and self.running:
            self._schedule_padding(out)
            return out
        self._end_static_batch_if_done()
        self._admit_waiting(out, budget, ignore_budget=static)
        if static:  # the whole batch is running now; give it its first chunks
            out.chunks.clear()
            self._schedule_running(out, self.config.max_num_batched_tokens)
        return out

    def step_done(self, out: SchedulerOutput) -> None:
        """The model computed the scheduled tokens: advance counters, publish full blocks."""
        for chunk in out.chunks:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            if chunk.pad:
                continue
            self.kv.publish_full_blocks(seq.blocks, seq.token_ids, seq.num_computed_tokens)

    def kv_slot_usage(self) -> tuple[int, int]:
        """(allocated slots, slots holding a computed token) over blocks live sequences hold."""
        bs = self.config.block_size
        filled: dict[int, int] = {}
        for seq in self.running:
            for i, block_id in enumerate(seq.blocks.block_ids):
                n = min(bs, max(0, seq.num_computed_tokens - i * bs))
                filled[block_id] = max(filled.get(block_id, 0), n)
        return self.allocator.num_used * bs, sum(filled.values())

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        queue = deque(self.running)
        kept: list[Sequence] = []
        while queue:
            seq = queue.popleft()
            n = min(seq.num_uncomputed_tokens, budget)
            if n <= 0:
                kept.append(seq)
                continue
            need = seq.num_computed_tokens + n
            if not self.kv.try_grow(seq.blocks, need):  # (one count where it fits: most do)
                while not self.kv.try_grow(seq.blocks, need) and self.padding:
                    self.kv.release(self.padding.pop().blocks)  # pad lanes never starve live ones
                while not self.kv.try_grow(seq.blocks, need) and queue:
                    self._preempt(queue.pop(), out)
                if not self.kv.try_grow(seq.blocks, need):
                    self._preempt(seq, out)
                    continue
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            kept.append(seq)
            budget -= n
        self.running = kept
        return budget

    def _schedule_padding(self, out: SchedulerOutput) -> None:
        """One pad token per finished lane of the static batch (where blocks allow)."""
        for seq in self.padding:
            pos = seq.num_computed_tokens
            if pos + 1 >= self.config.max_model_len or not self.kv.can_grow(seq.blocks, pos + 1):
                continue
            self.kv.grow(seq.blocks, pos + 1)
            out.chunks.append(ScheduledChunk(seq, pos, 1, pad=True))

    def _admit_waiting(self, out: SchedulerOutput, budget: int, ignore_budget: bool) -> None:
        cfg = self.config
        while self.waiting and len(self.running) < cfg.max_num_seqs:
            if budget <= 0 and not ignore_budget:
                return
            seq = self.waiting[0]
            if not seq.blocks.block_ids:
                seq.num_computed_tokens = self.kv.match_prefix(seq.blocks, seq.token_ids)
                self.prefix_hit_tokens += seq.num_computed_tokens
                self.prefix_query_tokens += len(seq.token_ids)
            want = seq.num_uncomputed_tokens
            n = want if ignore_budget else min(want, budget)
            fits_whole_budget = want <= cfg.max_num_batched_tokens
            if n < want and not cfg.chunked_prefill and (out.chunks or fits_whole_budget):
                return self._unmatch(seq)
            if ignore_budget:
                n = min(n, cfg.block_size)  # admission check only; chunks come later
            if not self.kv.can_grow(seq.blocks, seq.num_computed_tokens + n):
                return self._unmatch(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if not ignore_budget:
                self.kv.grow(seq.blocks, seq.num_computed_tokens + n)
                out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
                budget -= n

    def _unmatch(self, seq: Sequence) -> None:
        """Drop prefix-cache references of a sequence that could not be admitted."""
        self.prefix_hit_tokens -= seq.num_computed_tokens
        self.prefix_query_tokens -= len(seq.token_ids)
        self.kv.release(seq.blocks)
        seq.num_computed_tokens = 0

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.kv.release(seq.blocks)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        if seq in self.running:
            self.running.remove(seq)
