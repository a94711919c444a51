"""Executes one `SchedulerOutput` on the model: builds the flat batch, runs, returns logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import cpu_kernels
from engine.attention import AttentionMetadata, PrefillChunkMeta
from engine.config import ModelConfig
from engine.decode_graphs import DecodeGraphs
from engine.errors import InvalidRequestError
from engine.fused_decode import FusedDecode
from engine.linear import pack_linears
from engine.model import LlamaForCausalLM
from engine.scheduler import ScheduledChunk, SchedulerOutput


@dataclass(slots=True)
class StepBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    chunks: list[ScheduledChunk]  # in flat-batch order: decodes, then prefill chunks
    sample_rows: list[int]  # flat index of the last token of each sampling chunk
    sample_chunks: list[ScheduledChunk]


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        packed_gemm: bool = True,
        decode_graphs: str = "auto",
        max_batch: int = 64,
        max_blocks: int = 512,
    ):
        self.config = config
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = model.to_empty(device=self.device).to(dtype)
        model.rope = type(model.rope)(config).to(self.device)  # buffers were on meta
        if config.tie_word_embeddings:  # to_empty() unties shared parameters
            model.lm_head.weight = model.model.embed_tokens.weight
        model.load_weights(state_dict)
        if packed_gemm:  # CPU: MKL's (fp32) or oneDNN's (bf16) packed weights (engine.linear)
            pack_linears(model)
        self.model = model.eval()
        shape = (config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        # Zeroed, not empty: padded slots are multiplied by zero attention weight,
        # and garbage NaNs would survive that.
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.use_triton = self.device.type == "cuda"
        cpu_kernels.warm(self.device)  # built (or found built) now, not in a step
        mode = decode_graphs
        if mode == "auto":
            mode = "capture" if self.device.type == "cuda" else "off"
        self.graphs = None  # decode steps from CUDA graphs, or ("pad") their CPU twin
        if mode == "capture" and self.device.type != "cuda":
            raise InvalidRequestError("decode_graphs=capture needs a CUDA device")
        if mode != "off":
            capture = mode == "capture"
            self.graphs = DecodeGraphs(self.model, self.kv_cache, max_batch, max_blocks, capture)
        # bf16 on a CPU with AMX: a decode step's layers in one C++ call (engine.fused_decode)
        self.fused = FusedDecode.build(self.model, self.kv_cache)

    def prepare(self, out: SchedulerOutput) -> StepBatch:
        chunks = sorted(out.chunks, key=lambda c: c.num_tokens != 1)  # decodes first, stable
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        prefills: list[PrefillChunkMeta] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        for chunk in chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            blocks = seq.blocks.block_ids
            end = start + n
            if n == 1:
                decode_tables.append(blocks[: -(-end // bs)])
                decode_lens.append(end)
            else:
                prefills.append(
                    PrefillChunkMeta(len(ids), n, end, self._tensor(blocks[: -(-end // bs)]))
                )
            ids.extend([seq.token_ids[-1]] if chunk.pad else seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            if chunk.samples:
                sample_rows.append(len(ids) - 1)
        meta = AttentionMetadata(slot_mapping=self._tensor(slots), use_triton=self.use_triton)
        if decode_tables:
            width = max(len(t) for t in decode_tables)
            meta.num_decodes = len(decode_tables)
            meta.decode_block_tables = self._tensor(
                [t + [0] * (width - len(t)) for t in decode_tables]
            )
            meta.decode_context_lens = self._tensor(decode_lens, torch.int32)
        meta.prefills = prefills
        sample_chunks = [c for c in chunks if c.samples]
        return StepBatch(
            self._tensor(ids), self._tensor(positions), meta, chunks, sample_rows, sample_chunks
        )

    @torch.inference_mode()
    def forward(self, batch: StepBatch, layer_hook=None) -> torch.Tensor:
        """Run the decoder layers; the hidden states [T, hidden]."""
        rows = batch.input_ids.shape[0]
        graphs = self.graphs
        if graphs is not None and layer_hook is None and graphs.applies(batch.meta, rows):
            return graphs.run(batch.input_ids, batch.positions, batch.meta)
        fused = self.fused
        if fused is not None and layer_hook is None and fused.applies(batch.meta, rows):
            return fused.run(batch.input_ids, batch.positions, self.kv_cache, batch.meta)
        return self.model(batch.input_ids, batch.positions, self.kv_cache, batch.meta, layer_hook)

    @torch.inference_mode()
    def logits(self, batch: StepBatch, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [len(batch.sample_rows), V] (float32) of the rows that sample."""
        if not batch.sample_rows:
            return hidden.new_empty((0, self.config.vocab_size), dtype=torch.float32)
        return self.model.compute_logits(hidden[self._tensor(batch.sample_rows)])

    def _tensor(self, values, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)
