"""KVChunk framing for the gRPC transport: pages gathered straight into the message.

    send: lay out KVChunk{page} in a fresh `bytes`: header fields ── protobuf ──> bytes,
          checksum (4 bytes, filled last), payload field tag + length; then gather
          kv[layer, :, src] into the payload's place (the one copy on send), each slice
          CRC-32C'd right after its copy (kv_transfer.page_copy)
    recv: KVChunk bytes ── walk fields ──> header bytes ── protobuf ──> KVPage (no payload)
                                      └──> payload = memoryview slice (no copy)

Protobuf fields concatenate, so the result is an ordinary KVChunk on the wire
(the generated stub and servicer interoperate). grpcio sends only `bytes`: the
message is filled in place in a new, unzeroed one (page_copy.fresh_bytes). upb's own
parse of a 4 MiB bytes field runs at ~0.9 GB/s on the dev box; the hand walk costs
microseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kv_transfer.errors import KVTransferError
from kv_transfer.page_copy import fresh_bytes, gather_page
from kv_transfer.pages import (
    KVPageHeader,
    block_nbytes,
    dtype_name,
)
from splitserve_proto import kv_transfer_pb2 as pb

_PAGE_TAG = bytes([1 << 3 | 2])  # KVChunk.page, wire type 2 (length-delimited)
_CHECKSUM_TAG = bytes([6 << 3 | 5])  # KVPage.checksum, wire type 5 (fixed32)
_PAYLOAD_TAG = bytes([15 << 3 | 2])  # KVPage.payload, wire type 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_page(
    request_id: str,
    kv_cache: torch.Tensor,
    layer: int,
    src_block_ids: Sequence[int],
    dst_block_ids: Sequence[int],
) -> bytes:
    """KVChunk{page} for kv[layer, :, src_block_ids], to land at dst_block_ids."""
    shape = (2, len(src_block_ids), *kv_cache.shape[3:])
    size = block_nbytes(kv_cache) * len(src_block_ids)
    header = pb.KVPage(
        request_id=request_id,
        layer=layer,
        dst_block_ids=[int(b) for b in dst_block_ids],
        dtype=dtype_name(kv_cache.dtype),
        shape=shape,
    ).SerializeToString()
    payload_field = _PAYLOAD_TAG + _varint(size)
    page_len = len(header) + len(_CHECKSUM_TAG) + 4 + len(payload_field) + size
    prefix = b"".join(
        (_PAGE_TAG, _varint(page_len), header, _CHECKSUM_TAG, bytes(4), payload_field)
    )
    checksum_at = len(prefix) - len(payload_field) - 4

    message, view = fresh_bytes(len(prefix) + size)
    view[: len(prefix)] = prefix
    payload = view[len(prefix) :]
    checksum = gather_page(payload, kv_cache, layer, src_block_ids)
    view[checksum_at : checksum_at + 4] = checksum.to_bytes(4, "little")
    payload.release()
    view.release()
    return message if isinstance(message, bytes) else bytes(message)


@dataclass(frozen=True, slots=True)
class PageRef:
    """Pages to send, gathered only when gRPC takes them to send (encode_chunk): right
    before gRPC copies the message, so the copy reads it from cache. The caller keeps
    the source blocks until the call is acked or aborted."""

    request_id: str
    kv_cache: torch.Tensor
    layer: int
    src_block_ids: Sequence[int]
    dst_block_ids: Sequence[int]

    def encode(self) -> bytes:
        return encode_page(
            self.request_id, self.kv_cache, self.layer, self.src_block_ids, self.dst_block_ids
        )


def encode_chunk(item: PageRef | bytes | pb.KVChunk) -> bytes:
    """gRPC's request serializer: pages are gathered now (PageRef) or come encoded
    (encode_page); done is protobuf."""
    if isinstance(item, PageRef):
        return item.encode()
    return item if isinstance(item, bytes) else item.SerializeToString()


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _skip_field(data: memoryview, pos: int, wire_type: int) -> int:
    if wire_type == 0:
        return _read_varint(data, pos)[1]
    if wire_type == 2:
        size, pos = _read_varint(data, pos)
        return pos + size
    if wire_type in (1, 5):
        return pos + (8 if wire_type == 1 else 4)
    raise KVTransferError(f"malformed KVChunk: wire type {wire_type}")


@dataclass(frozen=True, slots=True)
class InboundPage:
    header: pb.KVPage  # without its payload
    payload: memoryview  # a view into the received message


def decode_chunk(data: bytes) -> pb.KVChunk | InboundPage:
    """A KVChunk, or for a page its header and a zero-copy view of its payload."""
    view = memoryview(data)
    if not data or data[0] != _PAGE_TAG[0]:
        return pb.KVChunk.FromString(data)
    size, start = _read_varint(view, 1)
    end = start + size
    if end != len(data):  # not a single page field: let protobuf sort it out
        return pb.KVChunk.FromString(data)
    pos, payload = start, None
    while pos < end:
        field_start = pos
        key, pos = _read_varint(view, pos)
        if key == _PAYLOAD_TAG[0]:
            size, pos = _read_varint(view, pos)
            payload, payload_span = view[pos : pos + size], (field_start, pos + size)
            pos += size
        else:
            pos = _skip_field(view, pos, key & 7)
    if payload is None:
        return pb.KVChunk.FromString(data)
    head = bytes(view[start : payload_span[0]]) + bytes(view[payload_span[1] : end])
    return InboundPage(pb.KVPage.FromString(head), payload)


def header_from_proto(page: pb.KVPage) -> KVPageHeader:
    return KVPageHeader(
        request_id=page.request_id,
        layer=page.layer,
        dst_block_ids=tuple(page.dst_block_ids),
        dtype=page.dtype,
        shape=tuple(page.shape),
        checksum=page.checksum,
    )
