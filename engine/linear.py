"""A Linear whose CPU weight is also held in a packed GEMM layout: MKL's for float32,
oneDNN's (AMX / AVX512-BF16 blocks) for bfloat16.

`F.linear` on CPU repacks the weight inside every sgemm call; for the small row counts of a
decode step (a few to a few dozen sequences) that repacking is a large part of the call.
MKL's packed layout does it once at load: at 32 rows and 2 threads the layer GEMMs of the
default model run 1.4-1.8x faster, with the same results as `F.linear` from 16 rows up
(the same kernel, one packing). Below `PACKED_MIN_ROWS` (one or a few streams: a GEMV,
bandwidth-bound) and above `PACKED_MAX_ROWS` (prefill, where the repacking is amortized)
`F.linear` is as fast or faster, so those calls keep it.

bfloat16: `F.linear` reorders the weight into oneDNN's blocked layout inside every call,
which halves its speed at every row count measured (1-512 rows, one thread: 109 vs 50 us
for one row of a 576x1536 layer). The packed copy is used for every call, with results
identical to `F.linear` (the same oneDNN kernel).

bfloat16 on a CPU with AMX: up to `AMX_MAX_ROWS` rows (every decode step) the weight is also
held in AMX tiles for engine/csrc/amx_linear.cpp, which streams it at 20-27 GB/s where
oneDNN's packed GEMM reaches 10-18 (1-32 rows, the default model's layer shapes, 2 threads):
1.3-2x faster, the decode step being bound by reading its weights. Its fp32 sums run in
another order than oneDNN's, so its results may differ from F.linear's by one bf16 rounding.
It is also the faster up to 1,024 rows (a prompt or a few): the layer GEMMs of the default
model, 2 threads, AMX vs oneDNN: 1.87 vs 1.31 TFLOP/s at 128 rows, 1.92 vs 1.52 at 512, 2.11
vs 1.82 at 1,024; prefill waves of 4 / 8 prompts of 128 tokens 153 -> 137 / 244 -> 232 ms.
Above it oneDNN is faster (2.09 vs 1.80 TFLOP/s at 2,048 rows, 2.11 vs 1.59 at 4,096).

    weights loaded ──pack()──> packed copy (CPU: fp32 with MKL, bf16 with oneDNN bf16;
                                else a no-op)
    forward(x): bf16 with AMX, rows <= AMX_MAX_ROWS          ──> AMX tile kernel
                bf16 packed                                  ──> oneDNN packed GEMM
                fp32 packed, rows in [MIN_ROWS, MAX_ROWS]    ──> MKL packed GEMM
                otherwise                                    ──> F.linear
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import cpu_kernels

PACKED_MIN_ROWS = 5
PACKED_MAX_ROWS = 64
_PACK_HINT_ROWS = 32  # MKL's packed B layout does not depend on the row count it is told
AMX_MAX_ROWS = 1024


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Packed GEMM exists for float32 on CPU builds of torch with MKL, and for bfloat16 on
    CPU builds with oneDNN where the CPU has bf16 instructions."""
    if device.type != "cpu":
        return False
    if dtype == torch.float32:
        return torch.backends.mkl.is_available() and hasattr(
            torch.ops.mkl, "_mkl_reorder_linear_weight"
        )
    if dtype == torch.bfloat16:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) with an optional packed weight."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.packed: torch.Tensor | None = None
        self.amx: torch.Tensor | None = None

    @torch.no_grad()
    def pack(self) -> None:
        """Pack the current weight (call after loading it; again if it changes)."""
        self.packed = None
        self.amx = amx_pack(self.weight) if amx_usable(self.weight) else None
        if not packing_available(self.weight.dtype, self.weight.device):
            return
        w = self.weight.detach().contiguous()
        if w.dtype == torch.bfloat16:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, _PACK_HINT_ROWS)
        else:
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(w, _PACK_HINT_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if self.packed is None or rows == 0:
            return F.linear(x, self.weight, self.bias)
        if self.packed.dtype == torch.bfloat16:  # AMX tiles for decode, oneDNN for the rest
            x2 = _rows(x, rows)
            if self.amx is not None and rows <= AMX_MAX_ROWS:
                out = _amx_linear(x2, self.amx)
            else:
                out = torch.ops.mkldnn._linear_pointwise(x2, self.packed, None, "none", [], "")
            if self.bias is not None:  # added after rounding, as F.linear does
                out = out + self.bias
        elif PACKED_MIN_ROWS <= rows <= PACKED_MAX_ROWS:
            x2 = _rows(x, rows)
            out = torch.ops.mkl._mkl_linear(x2, self.packed, self.weight, self.bias, rows)
        else:
            return F.linear(x, self.weight, self.bias)
        return out.view(*x.shape[:-1], out.shape[-1])


def _amx_linear(x: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    kernel = cpu_kernels.load()
    assert kernel is not None  # amx_usable() saw it built
    if not torch.autograd.profiler._is_profiler_enabled:  # record_function costs ~70 us a call
        return kernel.amx_linear(x, tiles)
    with torch.profiler.record_function("splitserve::amx_linear"):
        return kernel.amx_linear(x, tiles)


def amx_usable(weight: torch.Tensor) -> bool:
    """A bf16 CPU weight whose sides are multiples of 32, on a CPU whose AMX this process may
    use, with the kernels built."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
        return False
    if weight.shape[0] % 32 or weight.shape[1] % 32:
        return False
    kernels = cpu_kernels.load()
    return kernels is not None and bool(kernels.amx_available())


def amx_pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] in AMX B tiles, in the order amx_linear reads them:
    [N/32 column blocks, K/32 input blocks, 2 tiles of 16 columns, 16 input pairs, 16, 2]."""
    n, k = weight.shape
    tiles = weight.detach().reshape(n // 32, 2, 16, k // 32, 16, 2)
    return tiles.permute(0, 3, 1, 4, 2, 5).contiguous()


def _rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    x2 = x.reshape(rows, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


def pack_linears(model: nn.Module) -> int:
    """Pack every `Linear` of `model`; the number packed (0 where packing is unavailable)."""
    packed = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack()
            packed += module.packed is not None
    return packed
