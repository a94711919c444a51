"""Paged KV bookkeeping: a reference-counted block pool with prefix caching.

Pure Python (no torch): the scheduler owns it and tests build it from numbers.

A block is `block_size` token slots in the KV tensor. Full blocks are keyed by a
chained hash (hash of the previous block's key and this block's token ids), so a
prompt that shares a prefix with an earlier one reuses its blocks. Every hit is
checked against the stored token ids, so a hash collision is a miss, not wrong KV.
Freed blocks that hold a cached prefix stay in the free pool (least recently
freed first out) and can be revived by a hit until they are reused.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


class NoFreeBlocksError(RuntimeError):
    """Raised when the pool is empty; the scheduler avoids it by checking first."""


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0
    prefix_hash: int | None = None
    token_ids: tuple[int, ...] = field(default=())


def chain_hash(prev_hash: int | None, token_ids: Sequence[int]) -> int:
    return hash((prev_hash, tuple(token_ids)))


class BlockAllocator:
    """A fixed pool of KV blocks; free blocks kept in LRU order for prefix reuse.

    Blocks never used yet are not objects: `blocks` holds those handed out at least once
    (ids 0 .. len - 1), and a block past them is made when it is first allocated. The order
    is the same as a list of them all: never-used blocks first, by id, then the freed ones,
    least recently freed first. (A simulated fleet holds millions of blocks: making them all
    up front cost a 1,000-GPU simulation 10 s before its first step.)"""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._num_blocks = num_blocks
        self.blocks: list[KVBlock] = []
        self._free: OrderedDict[int, None] = OrderedDict()  # freed blocks, LRU first
        self._by_hash: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        return self._num_blocks - len(self.blocks) + len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        if len(self.blocks) < self._num_blocks:  # a never-used block first
            block_id = len(self.blocks)
            self.blocks.append(KVBlock(block_id, ref_count=1))
            return block_id
        if not self._free:
            raise NoFreeBlocksError("no free KV blocks")
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.prefix_hash is not None:  # evict its cached prefix
            self._by_hash.pop(block.prefix_hash, None)
            block.prefix_hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def free(self, block_id: int) -> None:
        block = self.blocks[block_id] if block_id < len(self.blocks) else None
        if block is None or block.ref_count <= 0:
            raise RuntimeError(f"double free of KV block {block_id}")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None

    def lookup(self, prefix_hash: int, token_ids: Sequence[int]) -> int | None:
        """Take a reference on the cached block for this prefix, if it holds these tokens."""
        if not self.enable_prefix_caching:
            return None
        block_id = self._by_hash.get(prefix_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.token_ids != tuple(token_ids):
            return None
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1
        return block_id

    def publish(self, block_id: int, prefix_hash: int, token_ids: Sequence[int]) -> None:
        """Record that a full block holds `token_ids` after the prefix `prefix_hash` chains."""
        if not self.enable_prefix_caching or prefix_hash in self._by_hash:
            return
        block = self.blocks[block_id]
        block.prefix_hash, block.token_ids = prefix_hash, tuple(token_ids)
        self._by_hash[prefix_hash] = block_id


@dataclass(slots=True)
class BlockTable:
    """The blocks one sequence holds, in token order, and how many are published."""

    block_ids: list[int] = field(default_factory=list)
    num_published: int = 0
    last_hash: int | None = None


class KVCacheManager:
    """Gives sequences the blocks they need, one step at a time (lazy: no waste ahead)."""

    def __init__(self, allocator: BlockAllocator):
        self.allocator = allocator
        self.block_size = allocator.block_size

    def blocks_needed(self, table: BlockTable, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(table.block_ids))

    def match_prefix(self, table: BlockTable, token_ids: Sequence[int]) -> int:
        """Attach cached blocks for the longest cached prefix; return tokens covered.

        The last token is never covered: the model must compute at least one token
        to produce logits.
        """
        assert not table.block_ids
        bs = self.block_size
        for start in range(0, len(token_ids) - 1 - bs + 1, bs):
            chunk = token_ids[start : start + bs]
            h = chain_hash(table.last_hash, chunk)
            block_id = self.allocator.lookup(h, chunk)
            if block_id is None:
                break
            table.block_ids.append(block_id)
            table.num_published += 1
            table.last_hash = h
        return len(table.block_ids) * bs

    def can_grow(self, table: BlockTable, num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(table, num_tokens) + reserve <= self.allocator.num_free

    def try_grow(self, table: BlockTable, num_tokens: int) -> bool:
        """grow() where the blocks are free (True), else nothing (False): can_grow and grow
        in one count, on the scheduler's path for every running sequence of every step."""
        need = self.blocks_needed(table, num_tokens)
        if need == 0:
            return True
        if need > self.allocator.num_free:
            return False
        for _ in range(need):
            table.block_ids.append(self.allocator.allocate())
        return True

    def grow(self, table: BlockTable, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens in total (the caller saw that they fit)."""
        if not self.try_grow(table, num_tokens):
            raise NoFreeBlocksError("no free KV blocks")

    def publish_full_blocks(self, table: BlockTable, token_ids: Sequence[int], num_computed: int):
        """Publish every block whose slots are all computed, for later prefix hits."""
        bs = self.block_size
        while (table.num_published + 1) * bs <= num_computed:
            i = table.num_published
            chunk = token_ids[i * bs : (i + 1) * bs]
            table.last_hash = chain_hash(table.last_hash, chunk)
            self.allocator.publish(table.block_ids[i], table.last_hash, chunk)
            table.num_published += 1

    def release(self, table: BlockTable) -> None:
        # Free in reverse so a sequence's tail blocks are reused first and its
        # prefix stays cached longest.
        for block_id in reversed(table.block_ids):
            self.allocator.free(block_id)
        table.block_ids.clear()
        table.num_published = 0
        table.last_hash = None
