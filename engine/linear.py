"""A Linear whose float32 CPU weight is also held in MKL's packed GEMM layout.

`F.linear` on CPU repacks the weight inside every sgemm call; for the small row counts of a
decode step (a few to a few dozen sequences) that repacking is a large part of the call.
MKL's packed layout does it once at load: at 32 rows and 2 threads the layer GEMMs of the
default model run 1.4-1.8x faster, with the same results as `F.linear` from 16 rows up
(the same kernel, one packing). Below `PACKED_MIN_ROWS` (one or a few streams: a GEMV,
bandwidth-bound) and above `PACKED_MAX_ROWS` (prefill, where the repacking is amortized)
`F.linear` is as fast or faster, so those calls keep it.

    weights loaded ──pack()──> packed copy (fp32, CPU, MKL present; else a no-op)
    forward(x): rows in [PACKED_MIN_ROWS, PACKED_MAX_ROWS] ──> mkl packed GEMM
                otherwise                                   ──> F.linear
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKED_MIN_ROWS = 5
PACKED_MAX_ROWS = 64
_PACK_HINT_ROWS = 32  # MKL's packed B layout does not depend on the row count it is told


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Packed GEMM exists for float32 on CPU builds of torch with MKL."""
    return (
        dtype == torch.float32
        and device.type == "cpu"
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    )


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) with an optional packed weight."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.packed: torch.Tensor | None = None

    @torch.no_grad()
    def pack(self) -> None:
        """Pack the current weight (call after loading it; again if it changes)."""
        if packing_available(self.weight.dtype, self.weight.device):
            w = self.weight.detach().contiguous()
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(w, _PACK_HINT_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if self.packed is None or not PACKED_MIN_ROWS <= rows <= PACKED_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(rows, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        out = torch.ops.mkl._mkl_linear(x2, self.packed, self.weight, self.bias, rows)
        return out.view(*x.shape[:-1], out.shape[-1])


def pack_linears(model: nn.Module) -> int:
    """Pack every `Linear` of `model`; the number packed (0 where packing is unavailable)."""
    packed = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack()
            packed += module.packed is not None
    return packed
