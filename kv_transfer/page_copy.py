"""Pages between a CPU cache and a flat payload, checksummed as they are copied.

    send: kv[l, 0, src] then kv[l, 1, src] ── slices of <= SLICE_BYTES ──> payload
    recv: payload ── the same slices ──> kv[l, :, dst]; the sum is compared once the
          whole payload is written
    each slice, with the engine's CPU kernels (engine.cpu_kernels: csrc/copy_crc.cpp):
          one pass, each 64 bytes loaded once, stored and folded into the sum (a run of
          consecutive blocks as one span, others block by block); without them, a memcpy
          (or an index op) and then CRC-32C of the slice while it is still in L2

Summing in the copy reads each byte once: 9.3 GB/s against 6.8 for copy-then-sum on
1 MiB slices of 256 MiB here (a memcpy alone 9.3). Checksumming the whole payload after (or
before) the copy read every byte a second time from L3 or DRAM: for a 4 MiB chunk that
was 0.16 ms of a 0.8 ms encode. The receiver writes before it knows the sum: it writes
only into the blocks the transfer reserved, and a wrong sum fails the transfer, which
frees them unread. Copies and sums keep the GIL: torch's copy_ and crc32c's
GIL-releasing mode (so a prefill's compute thread could run meanwhile) measured ~10%
slower here (1.14-1.17 vs 1.27-1.29 GB/s, 3 alternating rounds), with no clear TTFT gain.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Sequence

import crc32c
import torch

from engine import cpu_kernels
from kv_transfer.pages import (
    KVPageHeader,
    block_chunks,
    block_nbytes,
    check_checksum,
    gather_pages_into,
    payload_checksum,
    payload_view,
    write_pages,
)

SLICE_BYTES = 1 << 20  # inside a core's L2 (2 MiB here)


def _fused_ok(kv_cache: torch.Tensor) -> bool:
    """Whether the cache can be copied slice by slice here (a contiguous CPU tensor)."""
    return kv_cache.device.type == "cpu" and kv_cache.is_contiguous()


def _consecutive(ids: Sequence[int], run: range) -> bool:
    return all(ids[i + 1] == ids[i] + 1 for i in range(run.start, run.stop - 1))


class _Layer:
    """One layer of a CPU cache as bytes: [2, num_blocks, half] with half = a block's K (or V)."""

    def __init__(self, kv_cache: torch.Tensor, layer: int, ids: Sequence[int]) -> None:
        self.half = block_nbytes(kv_cache) // 2
        self.blocks = kv_cache.shape[2]
        self.tensor = kv_cache[layer].view(torch.uint8).view(2, self.blocks, self.half)
        self.bytes = payload_view(kv_cache[layer])
        self.ids = ids
        self._index: torch.Tensor | None = None
        self.kernels = cpu_kernels.load()  # None: copy, then sum

    def slices(self, data: memoryview) -> list[tuple[int, range, memoryview]]:
        """(half, positions, their piece of `data`) per slice, in payload order."""
        n = len(self.ids)
        runs = block_chunks(n, self.half, SLICE_BYTES)
        return [
            (h, run, data[(h * n + run.start) * self.half : (h * n + run.stop) * self.half])
            for h in (0, 1)
            for run in runs
        ]

    def copy(self, h: int, run: range, piece: memoryview, into_cache: bool, crc: int) -> int:
        """Copy the blocks at `run` of half `h` into `piece`, or `piece` into them, and
        return `crc` carried over piece's bytes."""
        kernels = self.kernels
        if _consecutive(self.ids, run):
            start = (h * self.blocks + self.ids[run.start]) * self.half
            cache = self.bytes[start : start + piece.nbytes]
            src, dst = (piece, cache) if into_cache else (cache, piece)
            if kernels is not None:
                return kernels.copy_crc32c(dst, src, crc)
            dst[:] = src
            return crc32c.crc32c(piece, crc, 0)  # 0: keep the GIL (measured faster here)
        if kernels is not None:
            half = self.bytes[h * self.blocks * self.half : (h + 1) * self.blocks * self.half]
            ids = list(self.ids[run.start : run.stop])
            return kernels.copy_blocks_crc32c(piece, half, self.half, ids, into_cache, crc)
        if into_cache:  # sum first: the slice comes into L2 for the copy
            crc = crc32c.crc32c(piece, crc, 0)
        if self._index is None:
            self._index = torch.tensor(list(self.ids), dtype=torch.long)
        index = self._index[run.start : run.stop]
        rows = torch.frombuffer(piece, dtype=torch.uint8).view(len(run), self.half)
        if into_cache:
            self.tensor[h].index_copy_(0, index, rows)
            return crc
        torch.index_select(self.tensor[h], 0, index, out=rows)
        return crc32c.crc32c(piece, crc, 0)


def gather_page(out: memoryview, kv_cache: torch.Tensor, layer: int, src_ids) -> int:
    """Copy kv[layer, :, src_ids] into `out` (writable, their size); returns its CRC-32C,
    summed as it is copied on a CPU cache (elsewhere: gathered on the device, copied
    over, then summed)."""
    if not _fused_ok(kv_cache):
        gather_pages_into(torch.frombuffer(out, dtype=torch.uint8), kv_cache, layer, src_ids)
        return payload_checksum(out)
    cache, crc = _Layer(kv_cache, layer, src_ids), 0
    for h, run, piece in cache.slices(out):
        crc = cache.copy(h, run, piece, False, crc)
    return crc


def land_page(kv_cache: torch.Tensor, header: KVPageHeader, payload) -> None:
    """Write a payload (layout and size already checked) into kv[layer, :, dst] and verify
    its CRC-32C (ChecksumMismatchError). On a CPU cache it is summed as it is copied, and
    a bad sum is found after the write; elsewhere it is checked before."""
    if not _fused_ok(kv_cache):
        check_checksum(header, payload_checksum(payload))
        write_pages(kv_cache, header, payload, verify=False)
        return
    cache, crc = _Layer(kv_cache, header.layer, header.dst_block_ids), 0
    for h, run, piece in cache.slices(memoryview(payload).cast("B")):
        crc = cache.copy(h, run, piece, True, crc)
    check_checksum(header, crc)


# ---- a `bytes` to fill in place -------------------------------------------------------------

_CPYTHON = platform.python_implementation() == "CPython"
_BYTES_DATA = bytes.__basicsize__ - 1  # offsetof(PyBytesObject, ob_sval): the data's address
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


def fresh_bytes(size: int) -> tuple[bytes | bytearray, memoryview]:
    """A new `bytes` of `size` and a writable view of it, to fill before it is shared.

    grpcio sends only `bytes`. CPython makes one without zeroing it (as C extensions
    do); a bytearray or BytesIO would zero it first, a pass over every byte. Elsewhere
    this is a bytearray, for the caller to copy into `bytes`.
    """
    if not _CPYTHON:
        buffer = bytearray(size)
        return buffer, memoryview(buffer)
    out = _new_bytes(None, size)
    array = (ctypes.c_char * size).from_address(id(out) + _BYTES_DATA)
    return out, memoryview(array).cast("B")
