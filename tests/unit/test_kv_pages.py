"""KV page wire layout and the inbound transfer state machine (no Ray, no network)."""

from __future__ import annotations

import pytest
import torch

from kv_transfer.errors import (
    ChecksumMismatchError,
    IllegalTransitionError,
    KVTransferError,
    UnknownTransferError,
)
from kv_transfer.pages import KVPageHeader, payload_checksum, split_layer_pages, write_pages
from kv_transfer.state import TransferState, TransferTable

S = TransferState


def _cache(dtype, layers=3, blocks=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((layers, 2, blocks, 16, 3, 64), generator=g).to(dtype)


def _shuffled(n, k, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist()


def test_checksum_is_crc32c_over_any_buffer():
    # the wire's checksum is CRC-32C: the standard check value, so other peers can verify it
    assert payload_checksum(b"123456789") == 0xE3069283
    pages = _cache(torch.float32)[0]
    raw = pages.numpy().tobytes()
    view = memoryview(pages.view(torch.uint8).reshape(-1).numpy())
    assert payload_checksum(view) == payload_checksum(raw)  # a tensor's own memory, no copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_chunk_bytes", [1, 50_000, 4 << 20])
def test_pages_round_trip_bit_identical(dtype, max_chunk_bytes):
    src = _cache(dtype)
    dst = torch.zeros_like(src)
    src_ids, dst_ids = _shuffled(40, 17, 1), _shuffled(40, 17, 2)
    block_bytes = 2 * 16 * 3 * 64 * src.element_size()
    for layer in range(src.shape[0]):
        chunks = split_layer_pages("r", src, layer, src_ids, dst_ids, max_chunk_bytes)
        want_chunks = -(-17 // max(1, max_chunk_bytes // block_bytes))
        assert len(chunks) == want_chunks
        for header, payload in chunks:
            assert payload.nbytes <= max(max_chunk_bytes, block_bytes)
            write_pages(dst, header, bytes(payload))  # bytes: as received off the wire
    assert torch.equal(dst[:, :, dst_ids].view(torch.uint8), src[:, :, src_ids].view(torch.uint8))
    untouched = sorted(set(range(40)) - set(dst_ids))
    assert not dst[:, :, untouched].any()


def test_bad_checksum_is_refused_and_cache_untouched():
    src = _cache(torch.float32)
    dst = torch.zeros_like(src)
    ((header, payload),) = split_layer_pages("r", src, 1, [3, 4], [5, 6])
    corrupt = bytearray(payload)
    corrupt[100] ^= 0x01
    with pytest.raises(ChecksumMismatchError):
        write_pages(dst, header, bytes(corrupt))
    assert not dst.any()


@pytest.mark.parametrize(
    "change",
    [
        {"dtype": "float16"},
        {"shape": (2, 2, 16, 3, 32)},
        {"layer": 9},
        {"dst_block_ids": (5, 99)},
    ],
)
def test_layout_mismatch_is_refused(change):
    src = _cache(torch.float32)
    ((header, payload),) = split_layer_pages("r", src, 1, [3, 4], [5, 6])
    fields = {f: getattr(header, f) for f in KVPageHeader.__slots__} | change
    with pytest.raises(KVTransferError):
        write_pages(torch.zeros_like(src), KVPageHeader(**fields), bytes(payload))


# ---- state machine ---------------------------------------------------------------------


def _page(request_id, layer, blocks):
    return KVPageHeader(request_id, layer, tuple(blocks), "float32", (2, len(blocks)), 0)


def _table_with(request_id="r", blocks=(7, 8, 9), layers=2, lease_s=10.0):
    table = TransferTable()
    table.reserve(request_id, blocks, layers, lease_s, now=100.0)
    return table


def test_normal_path_reserved_to_freed():
    table = _table_with()
    t = table.get("r")
    assert t.state is S.RESERVED
    table.on_page(_page("r", 0, [9, 7]))
    assert t.state is S.TRANSFERRING
    table.on_page(_page("r", 0, [8]))
    table.on_page(_page("r", 1, [7, 8, 9]))
    assert table.on_done("r", first_token_id=5, num_prompt_tokens=40) is t
    assert t.state is S.READY and t.first_token_id == 5
    t.start_running()
    assert table.free("r").state is S.FREED
    assert table.get("r") is None and table.owned_blocks() == set()


def test_done_with_a_layer_missing_fails_then_frees():
    table = _table_with()
    table.on_page(_page("r", 0, [7, 8, 9]))
    table.on_page(_page("r", 1, [7, 8]))  # block 9 of layer 1 never came
    t = table.on_done("r", 5, 40)
    assert t.state is S.FAILED and "missing" in t.failure_reason
    table.free("r")
    assert t.state is S.FREED


def test_abort_mid_transfer_ends_freed():
    table = _table_with()
    table.on_page(_page("r", 0, [7]))
    t = table.release("r", "client went away")
    assert t.state is S.FREED and t.failure_reason == "client went away"
    with pytest.raises(UnknownTransferError):  # late pages of the aborted request
        table.on_page(_page("r", 0, [8]))


def test_lease_expiry_ends_freed_and_late_pages_are_refused():
    table = _table_with(lease_s=10.0)
    table.on_page(_page("r", 0, [7]))
    assert table.expire(now=109.9) == []
    (t,) = table.expire(now=110.0)
    assert t.state is S.EXPIRED
    assert table.expire(now=200.0) == []  # expires once
    with pytest.raises(IllegalTransitionError):
        table.on_page(_page("r", 0, [8]))
    table.free("r")
    assert t.state is S.FREED


def test_bad_checksum_path_fail_then_free():
    table = _table_with()
    table.on_page(_page("r", 0, [7, 8, 9]))
    t = table.fail("r", "checksum mismatch")
    assert t.state is S.FAILED
    assert table.fail("r", "again") is None  # already failed
    table.free("r")
    assert t.state is S.FREED


def test_pages_for_unreserved_blocks_or_unknown_requests_are_rejected():
    table = _table_with()
    table.reserve("other", [1, 2], 2, 10.0, now=100.0)
    with pytest.raises(KVTransferError, match="not reserved"):
        table.on_page(_page("r", 0, [7, 1]))  # block 1 belongs to "other"
    with pytest.raises(KVTransferError, match="out of range"):
        table.on_page(_page("r", 5, [7]))
    with pytest.raises(UnknownTransferError):
        table.on_page(_page("nobody", 0, [7]))
    with pytest.raises(KVTransferError, match="already reserved"):
        table.reserve("third", [9, 3], 2, 10.0)


@pytest.mark.parametrize(
    "path",
    [
        ["free"],  # RESERVED -> FREED skips FAILED
        ["start_running"],  # not READY
        ["page", "done", "done"],  # done twice
        ["page", "done", "start_running", "fail"],  # RUNNING cannot fail, only free
        ["page", "done", "start_running", "free", "free"],  # freed twice
    ],
)
def test_illegal_transitions_raise(path):
    table = _table_with(layers=1)
    t = table.get("r")
    steps = {
        "page": lambda: t.on_page(_page("r", 0, [7, 8, 9])),
        "done": lambda: t.on_done(1, 1),
        "start_running": t.start_running,
        "fail": lambda: t.fail("x"),
        "free": t.free,
    }
    *ok, bad = path
    for step in ok:
        steps[step]()
    with pytest.raises(IllegalTransitionError):
        steps[bad]()
