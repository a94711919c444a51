"""Keep large freed buffers in the process heap instead of handing them back to the kernel.

glibc serves blocks over its (adaptive) mmap threshold with fresh mmap()s and gives freed
memory at the top of a heap back with trim/madvise, so a buffer of a few MiB allocated and
freed over and over pays page faults and page zeroing in the kernel every time. With fixed
thresholds the same memory is reused. Every engine sets them (LLMEngine), as do the
processes that move KV:
- a prefill step's activations ([2,048 tokens, 3,072] bf16 is 12 MiB) are allocated and
  freed in every layer: a wave of 32 prompts of 128 tokens (bf16, 2 threads) took 930 ms
  with glibc's defaults and 740 ms with these (4 rounds each, alternating);
- each KV chunk allocates a few MiB on both ends (the message the pages are gathered
  into, gRPC's copy of it, the received bytes): the gRPC KV bench on the dev box went
  from ~0.9 to ~1.2 GB/s.
The cost is that up to `trim_threshold` of freed memory stays mapped per heap. 32 MiB is
the largest mmap threshold glibc accepts on 64-bit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Set glibc's thresholds once per process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
