"""Decode steps from CUDA graphs captured for a set of batch sizes (as vLLM does).

A decode step on a GPU is a few hundred small kernel launches; at small batches the GPU
waits on the CPU that launches them. A CUDA graph replays a whole step's launches at
once. A graph has fixed shapes and fixed input addresses, so:

    at load: static input buffers for the largest bucket; for each bucket b (descending),
        one eager warm-up step, then the step captured on b rows (`capture`)
    each decode-only step of n rows (n <= the largest bucket, no layer hook):
        b = the smallest bucket >= n; rows 0..n-1 copied into the static buffers, rows
        n..b-1 copies of row n-1 (they write the same K/V into the same slot, and their
        outputs are dropped); replay graph b (or, with no graphs, run the model on the
        same padded buffers: "pad", the CPU twin of this path); hidden[:n]
    prefill, mixed steps, larger batches: eager, as before

Nothing in the step syncs with the host: the decode attention (Triton on CUDA) reads
context lengths and block tables from device memory, and the table width is fixed at
the longest sequence's.
"""

from __future__ import annotations

import bisect

import torch

from engine.attention import AttentionMetadata

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def buckets_for(max_batch: int) -> list[int]:
    found = [b for b in BUCKETS if b < max_batch]
    return [*found, max_batch]


class DecodeGraphs:
    def __init__(
        self, model, kv_cache: torch.Tensor, max_batch: int, max_blocks: int, capture: bool
    ):
        self.model, self.kv_cache = model, kv_cache
        self.buckets = buckets_for(max_batch)
        n, dev = self.buckets[-1], kv_cache.device
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(n, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(n, max_blocks, dtype=torch.int64, device=dev)
        self.lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.use_triton = dev.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def applies(self, meta: AttentionMetadata, rows: int) -> bool:
        """A decode-only step that fits the largest bucket."""
        return (
            not meta.prefills
            and meta.num_decodes == rows
            and 0 < rows <= self.buckets[-1]
            and meta.decode_block_tables is not None
            and meta.decode_block_tables.shape[1] <= self.tables.shape[1]
        )

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        n = input_ids.shape[0]
        b = self.buckets[bisect.bisect_left(self.buckets, n)]
        self._fill(input_ids, positions, meta, n, b)
        if b in self.graphs:
            self.graphs[b].replay()
            return self.outputs[b][:n]
        return self._step(b)[:n]

    def _fill(self, input_ids, positions, meta: AttentionMetadata, n: int, b: int) -> None:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        width = meta.decode_block_tables.shape[1]
        self.ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.tables[:n, :width].copy_(meta.decode_block_tables)
        self.tables[:n, width:].zero_()
        self.lens[:n].copy_(meta.decode_context_lens)
        if b > n:  # padding rows: the last row again
            for buf in (self.ids, self.positions, self.slots, self.lens, self.tables):
                buf[n:b].copy_(buf[n - 1 : n].expand_as(buf[n:b]))

    def _step(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:b],
            num_decodes=b,
            decode_block_tables=self.tables[:b],
            decode_context_lens=self.lens[:b],
            use_triton=self.use_triton,
        )
        return self.model(self.ids[:b], self.positions[:b], self.kv_cache, meta)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """At load, before any request: the warm-up steps write only block 0, slot 0."""
        pool = None
        for b in reversed(self.buckets):  # largest first: the others reuse its memory
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step(b)  # warm-up: allocations and autotuning happen outside the graph
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self._step(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
