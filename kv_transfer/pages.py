"""KV pages on the wire: one layer of one request, split by whole blocks into chunks.

    prefill P                                            decode D
    kv[l, :, src_blocks]                                 kv[l, :, dst_blocks]
      │ gather_pages: index_select, the one copy-out       ▲ write_pages: index_copy_ (or a
      ▼                                                    │   slice copy for a run of ids)
    pages [2, n, block_size, kv_heads, head_dim]         torch.frombuffer(payload), no copy
      │ split by blocks: each chunk <= max_chunk_bytes     ▲ check_page: crc32c, dtype, shape,
      ▼ crc32c(payload) -> KVPageHeader                    │   layer and block ids in range
    (KVPageHeader, payload bytes) ──── transport ──────────┘

A chunk always holds at least one whole block, so a block larger than
max_chunk_bytes travels alone. Payload bytes are the tensor's memory as is
(little-endian on every platform we run); bfloat16 travels as raw 2-byte words.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import crc32c
import torch

from kv_transfer.errors import ChecksumMismatchError, KVTransferError

# torch.frombuffer on bytes received from the network (read-only) warns once; we only read it.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

DEFAULT_MAX_CHUNK_BYTES = 4 << 20


def payload_checksum(payload) -> int:
    """CRC-32C (Castagnoli) of a payload, in hardware: ~27 GB/s here, where zlib.crc32
    runs at 4 GB/s and was a quarter of the gRPC transport's CPU time."""
    return crc32c.crc32c(payload)


_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}


@dataclass(frozen=True, slots=True)
class KVPageHeader:
    """What the receiver needs to place a payload: payload = pages
    [2, len(dst_block_ids), block_size, kv_heads, head_dim] of `layer`."""

    request_id: str
    layer: int
    dst_block_ids: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    shape: tuple[int, ...]
    checksum: int  # payload_checksum: CRC-32C of the payload bytes

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * dtype_from_name(self.dtype).itemsize


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise KVTransferError(f"unsupported KV dtype {name!r}")
    return _DTYPES[name]


def block_nbytes(kv_cache: torch.Tensor) -> int:
    """Bytes one block of one layer takes on the wire (K and V)."""
    return 2 * kv_cache[0, 0, 0].numel() * kv_cache.element_size()


def block_chunks(num_blocks: int, bytes_per_block: int, max_chunk_bytes: int) -> list[range]:
    """Split block positions [0, num_blocks) into runs of <= max_chunk_bytes (>= 1 block)."""
    per_chunk = max(1, max_chunk_bytes // max(1, bytes_per_block))
    return [range(i, min(i + per_chunk, num_blocks)) for i in range(0, num_blocks, per_chunk)]


def gather_pages(kv_cache: torch.Tensor, layer: int, src_block_ids: Sequence[int]) -> torch.Tensor:
    """kv[layer, :, src_block_ids] as one new contiguous tensor on the cache's device."""
    index = torch.tensor(list(src_block_ids), dtype=torch.long, device=kv_cache.device)
    # kv_cache[layer]: [2, num_blocks, block_size, kv_heads, head_dim]
    return kv_cache[layer].index_select(1, index)


def gather_pages_into(
    out: torch.Tensor, kv_cache: torch.Tensor, layer: int, src_block_ids: Sequence[int]
) -> None:
    """Copy kv[layer, :, src_block_ids] into `out`, a flat uint8 CPU tensor of their size
    (e.g. over a message buffer: any alignment, as the copy runs on bytes)."""
    layer_bytes = kv_cache[layer].view(torch.uint8)  # [2, blocks, block_size, heads, dim*size]
    pages = out.view(2, len(src_block_ids), *layer_bytes.shape[2:])
    index = torch.tensor(list(src_block_ids), dtype=torch.long, device=kv_cache.device)
    if kv_cache.device.type == "cpu":
        torch.index_select(layer_bytes, 1, index, out=pages)
    else:  # gather on the device, then one copy to the host
        pages.copy_(layer_bytes.index_select(1, index))


def payload_view(pages: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (keeps the tensor alive)."""
    if pages.device.type != "cpu" or not pages.is_contiguous():
        raise ValueError("payload_view needs a contiguous CPU tensor")
    return memoryview(pages.view(torch.uint8).reshape(-1).numpy())  # type: ignore[arg-type]


def make_header(
    request_id: str, layer: int, dst_block_ids: Sequence[int], pages: torch.Tensor, payload
) -> KVPageHeader:
    return KVPageHeader(
        request_id=request_id,
        layer=layer,
        dst_block_ids=tuple(int(b) for b in dst_block_ids),
        dtype=dtype_name(pages.dtype),
        shape=tuple(pages.shape),
        checksum=payload_checksum(payload),
    )


def split_layer_pages(
    request_id: str,
    kv_cache: torch.Tensor,
    layer: int,
    src_block_ids: Sequence[int],
    dst_block_ids: Sequence[int],
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> list[tuple[KVPageHeader, memoryview]]:
    """Copy one layer's pages out of the cache as (header, payload) chunks."""
    if len(src_block_ids) != len(dst_block_ids):
        raise KVTransferError(
            f"{request_id}: {len(src_block_ids)} source, {len(dst_block_ids)} destination blocks"
        )
    chunks = []
    for run in block_chunks(len(src_block_ids), block_nbytes(kv_cache), max_chunk_bytes):
        pages = gather_pages(kv_cache, layer, [src_block_ids[i] for i in run]).cpu()
        payload = payload_view(pages)
        dst = [dst_block_ids[i] for i in run]
        chunks.append((make_header(request_id, layer, dst, pages, payload), payload))
    return chunks


def check_layout(kv_cache: torch.Tensor, header: KVPageHeader) -> None:
    """Raise KVTransferError unless pages with this header fit this cache."""
    rid = header.request_id
    if header.dtype != dtype_name(kv_cache.dtype):
        raise KVTransferError(f"{rid}: pages are {header.dtype}, cache is {kv_cache.dtype}")
    expected = (2, len(header.dst_block_ids), *kv_cache.shape[3:])
    if tuple(header.shape) != expected:
        raise KVTransferError(f"{rid}: page shape {header.shape}, cache expects {expected}")
    if not 0 <= header.layer < kv_cache.shape[0]:
        raise KVTransferError(f"{rid}: layer {header.layer} out of range")
    num_blocks = kv_cache.shape[2]
    if any(not 0 <= b < num_blocks for b in header.dst_block_ids):
        raise KVTransferError(f"{rid}: destination block out of range [0, {num_blocks})")


def check_page(
    kv_cache: torch.Tensor, header: KVPageHeader, payload, checksum: bool = True
) -> None:
    """check_layout, plus the payload's size and (unless told not to: the caller sums it
    as it copies) its checksum (ChecksumMismatchError)."""
    check_layout(kv_cache, header)
    size = memoryview(payload).nbytes
    if size != header.nbytes:
        raise KVTransferError(
            f"{header.request_id}: payload is {size} bytes, header says {header.nbytes}"
        )
    if checksum:
        check_checksum(header, payload_checksum(payload))


def check_checksum(header: KVPageHeader, checksum: int) -> None:
    """ChecksumMismatchError unless `checksum` (the payload's CRC-32C) is the header's."""
    if checksum != header.checksum:
        raise ChecksumMismatchError(
            f"{header.request_id}: checksum mismatch on layer {header.layer} (corrupt pages)"
        )


def write_pages(kv_cache: torch.Tensor, header: KVPageHeader, payload, verify: bool = True) -> None:
    """Write a payload into kv[layer, :, dst_block_ids] (checked first unless verify=False)."""
    if verify:
        check_page(kv_cache, header, payload)
    if not header.dst_block_ids:
        return
    pages = torch.frombuffer(payload, dtype=torch.uint8).view(kv_cache.dtype).view(header.shape)
    write_pages_tensor(kv_cache, header.layer, header.dst_block_ids, pages)


def write_pages_tensor(
    kv_cache: torch.Tensor, layer: int, dst_block_ids: Sequence[int], pages: torch.Tensor
) -> None:
    """kv[layer, :, dst_block_ids] = pages ([2, n, block_size, kv_heads, head_dim]), one copy."""
    if not dst_block_ids:
        return
    first = dst_block_ids[0]
    layer_kv = kv_cache[layer]  # [2, num_blocks, block_size, kv_heads, head_dim]
    pages = pages.to(kv_cache.device)
    if list(dst_block_ids) == list(range(first, first + len(dst_block_ids))):
        layer_kv[:, first : first + len(dst_block_ids)].copy_(pages)
    else:
        index = torch.tensor(list(dst_block_ids), dtype=torch.long, device=kv_cache.device)
        layer_kv.index_copy_(1, index, pages)
