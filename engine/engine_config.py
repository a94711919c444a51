"""The engine's one validated config; CLI flags and the offline API map onto it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import InvalidRequestError
from engine.scheduler import SchedulingPolicy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", "float32", "bfloat16")  # what the CLI takes; auto: native_dtype()
DECODE_GRAPHS = ("auto", "off", "pad", "capture")  # engine.decode_graphs; auto: capture on CUDA


def native_dtype(device: str) -> str:
    """The fastest dtype this host computes natively: bfloat16 on a GPU with bf16 and on a CPU
    with AMX or AVX512-BF16 (its GEMMs run 3-5x float32's here); float32 elsewhere, where bf16
    is converted in software and runs slower than float32."""
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    cpu = torch.cpu
    native = cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported()
    return "bfloat16" if native else "float32"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str = "smollm2-135m"
    dtype: str = "float32"
    scheduling: str = "continuous"  # "continuous" | "static"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_cache_gb
    kv_cache_gb: float = 2.0
    max_model_len: int | None = None  # None: the model's own, capped at 8192
    enable_prefix_caching: bool = True
    chunked_prefill: bool = True
    num_threads: int | None = None
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    max_tpot_ms: float | None = None  # decode: bound the batch to hold this TPOT (None: off)
    packed_gemm: bool = True  # CPU: a packed copy of the weights (engine.linear)
    decode_graphs: str = "auto"  # engine.decode_graphs: auto (CUDA graphs on a GPU), off, pad

    def __post_init__(self) -> None:
        if self.dtype == "auto":  # resolved once, where the config is made: every worker
            object.__setattr__(self, "dtype", native_dtype(self.torch_device))  # gets the same
        if self.dtype not in DTYPES:
            raise InvalidRequestError(
                f"unsupported dtype {self.dtype!r}; choose one of auto, {', '.join(DTYPES)}"
            )
        if self.scheduling not in {p.value for p in SchedulingPolicy}:
            raise InvalidRequestError(
                f"unknown scheduling {self.scheduling!r}; choose continuous or static"
            )
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) <= 0:
                raise InvalidRequestError(f"{name} must be positive")
        if self.decode_graphs not in DECODE_GRAPHS:
            raise InvalidRequestError(
                f"unknown decode_graphs {self.decode_graphs!r}; choose {', '.join(DECODE_GRAPHS)}"
            )
        if self.max_tpot_ms is not None and not self.max_tpot_ms > 0:
            raise InvalidRequestError(f"max_tpot_ms must be positive, got {self.max_tpot_ms}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise InvalidRequestError("num_kv_blocks must be positive")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device
