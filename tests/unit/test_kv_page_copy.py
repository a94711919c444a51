"""Pages copied slice by slice with their CRC-32C summed as they go (kv_transfer.page_copy):
in one pass with the engine's CPU kernels (csrc/copy_crc.cpp), and without them."""

from __future__ import annotations

import os

import crc32c
import pytest
import torch

import kv_transfer.page_copy as page_copy
from engine import cpu_kernels
from kv_transfer.errors import ChecksumMismatchError
from kv_transfer.grpc_codec import PageRef, decode_chunk, encode_chunk, header_from_proto
from kv_transfer.page_copy import fresh_bytes, gather_page, land_page
from kv_transfer.pages import gather_pages, make_header, payload_checksum, payload_view


def _cache(dtype, blocks=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((3, 2, blocks, 16, 3, 64), generator=g).to(dtype)


IDS = {
    "consecutive": list(range(5, 22)),
    "shuffled": torch.randperm(40, generator=torch.Generator().manual_seed(1))[:17].tolist(),
    "runs": [1, 2, 3, 9, 10, 30, 31, 32, 33, 0],
}


@pytest.fixture(params=[1 << 20, 7_000])  # one slice a half; several (some of one block)
def slices(request, monkeypatch, kernels):
    monkeypatch.setattr(page_copy, "SLICE_BYTES", request.param)


@pytest.fixture(params=["kernels", "torch"])
def kernels(request, monkeypatch):
    if request.param == "kernels" and cpu_kernels.load() is None:
        pytest.skip("the CPU kernels cannot be built here")
    if request.param == "torch":  # a machine where they cannot be built
        monkeypatch.setattr(page_copy.cpu_kernels, "load", lambda: None)


# around the folding's 256-byte steps and 512-byte minimum, and large
@pytest.mark.parametrize("size", [0, 1, 7, 8, 255, 256, 511, 512, 513, 768, 3073, (1 << 20) + 13])
def test_copy_crc32c_copies_and_sums_like_crc32c(size):
    kernels = cpu_kernels.load()
    if kernels is None:
        pytest.skip("the CPU kernels cannot be built here")
    src = memoryview(os.urandom(size + 3))[3:]  # not aligned
    for carried in (0, 0x1234ABCD, 0xFFFFFFFF):  # a sum carried over from earlier bytes
        dst = bytearray(size)
        assert kernels.copy_crc32c(dst, src, carried) == crc32c.crc32c(src, carried)
        assert dst == src


def test_copy_blocks_crc32c_refuses_a_block_outside_the_cache():
    kernels = cpu_kernels.load()
    if kernels is None:
        pytest.skip("the CPU kernels cannot be built here")
    blocks, flat = bytearray(64 * 10), bytearray(64 * 2)
    with pytest.raises(IndexError, match="block id out of range"):
        kernels.copy_blocks_crc32c(flat, blocks, 64, [3, 10], False, 0)
    with pytest.raises(ValueError, match="not len"):
        kernels.copy_blocks_crc32c(flat, blocks, 64, [3], False, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids", IDS.values(), ids=IDS.keys())
def test_gather_equals_the_pages_and_their_crc(slices, dtype, ids):
    kv = _cache(dtype)
    want = gather_pages(kv, 1, ids)
    buffer, view = fresh_bytes(want.numel() * want.element_size())
    checksum = gather_page(view, kv, 1, ids)
    assert bytes(buffer) == bytes(payload_view(want))
    assert checksum == payload_checksum(payload_view(want))


@pytest.mark.parametrize("ids", IDS.values(), ids=IDS.keys())
def test_land_writes_only_the_destination_blocks(slices, ids):
    src, dst = _cache(torch.bfloat16), torch.zeros(3, 2, 40, 16, 3, 64, dtype=torch.bfloat16)
    pages = gather_pages(src, 2, list(range(len(ids))))
    header = make_header("r", 2, ids, pages, payload_view(pages))
    land_page(dst, header, bytes(payload_view(pages)))  # bytes: as received
    assert torch.equal(dst[2][:, ids], pages)
    others = [b for b in range(40) if b not in ids]
    assert not dst[2][:, others].any() and not dst[:2].any()


def test_land_raises_on_a_corrupt_payload_and_stays_in_its_blocks(slices):
    src, dst = _cache(torch.float32), torch.zeros(3, 2, 40, 16, 3, 64)
    pages = gather_pages(src, 0, [4, 5, 6])
    header = make_header("r", 0, [7, 8, 9], pages, payload_view(pages))
    corrupt = bytearray(payload_view(pages))
    corrupt[-1] ^= 0x01
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch on layer 0"):
        land_page(dst, header, bytes(corrupt))
    assert not dst[:, :, [b for b in range(40) if b not in (7, 8, 9)]].any()


def test_a_page_ref_encodes_to_a_checked_kv_chunk(kernels):
    # what gRPC sends for a queued page: an ordinary KVChunk whose payload and crc check
    kv = _cache(torch.bfloat16)
    message = encode_chunk(PageRef("r", kv, 2, [3, 1, 2], [0, 5, 6]))
    assert isinstance(message, bytes)
    page = decode_chunk(message)
    header = header_from_proto(page.header)
    assert header.dst_block_ids == (0, 5, 6) and header.layer == 2
    assert bytes(page.payload) == bytes(payload_view(gather_pages(kv, 2, [3, 1, 2])))
    assert header.checksum == payload_checksum(page.payload)


def test_fresh_bytes_are_bytes_filled_in_place():
    buffer, view = fresh_bytes(5)
    view[:] = b"hello"
    assert isinstance(buffer, bytes) and buffer == b"hello"
