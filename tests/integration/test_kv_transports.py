"""KV transports end to end on loopback: gRPC in one process, collective between Ray actors."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kv_transfer.errors import KVTransferError
from kv_transfer.grpc_transport import GrpcKVSender, GrpcKVServer
from kv_transfer.state import TransferState, TransferTable

WAIT_S = 20


def _cache(layers, blocks, dtype=torch.float32, block_size=16, kv_heads=3, head_dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (layers, 2, blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=g).to(dtype)


class _Decode:
    """A GrpcKVServer with a table and a READY log, as the decode worker wires them."""

    def __init__(self, kv: torch.Tensor):
        self.kv, self.table, self.ready, self.failed = kv, TransferTable(), [], []
        self.landed = threading.Event()
        self.server = GrpcKVServer(kv, self.table, self._on_ready, on_failed=self.failed.append)
        self.endpoint = self.server.start()

    def _on_ready(self, transfer):
        self.ready.append(transfer)
        self.landed.set()


@pytest.fixture
def decode_side():
    made = []

    def make(kv):
        made.append(_Decode(kv))
        return made[-1]

    yield make
    for d in made:
        d.server.stop()


@pytest.fixture
def sender():
    s = GrpcKVSender(max_chunk_bytes=256 << 10)
    yield s
    s.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grpc_prompt_kv_lands_bit_identical_and_ready_fires_once(decode_side, sender, dtype):
    # a 2,000-token prompt: 125 blocks of 16 tokens, 3 kv heads x 64, 8 layers
    layers, n = 8, 125
    src = _cache(layers, 300, dtype)
    dst = torch.zeros_like(src)
    decode = decode_side(dst)
    src_ids = torch.randperm(300, generator=torch.Generator().manual_seed(1))[:n].tolist()
    dst_ids = torch.randperm(300, generator=torch.Generator().manual_seed(2))[:n].tolist()
    decode.table.reserve("req-1", dst_ids, layers, lease_s=60)

    sender.begin("req-1", decode.endpoint)
    for layer in range(layers):
        sender.send_layer("req-1", src, layer, src_ids, dst_ids)
    sender.finish("req-1", first_token_id=42, num_prompt_tokens=2000, timeout_s=WAIT_S)

    assert decode.landed.wait(WAIT_S)
    assert [t.request_id for t in decode.ready] == ["req-1"]
    ready = decode.ready[0]
    assert ready.state is TransferState.READY
    assert (ready.first_token_id, ready.num_prompt_tokens) == (42, 2000)
    got = dst[:, :, dst_ids].view(torch.uint8)
    assert torch.equal(got, src[:, :, src_ids].view(torch.uint8))
    untouched = sorted(set(range(300)) - set(dst_ids))
    assert not dst[:, :, untouched].any()


def test_grpc_to_dead_endpoint_raises_within_timeout(sender):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kv = _cache(2, 4)
    start = time.monotonic()
    sender.begin("lost", f"127.0.0.1:{port}")
    with pytest.raises(KVTransferError):
        sender.send_layer("lost", kv, 0, [0, 1], [0, 1])
        sender.finish("lost", 1, 16, timeout_s=5)
    assert time.monotonic() - start < 6


def test_grpc_corrupt_page_fails_transfer_and_sender(decode_side, sender, monkeypatch):
    import kv_transfer.grpc_sender as gt

    src = _cache(2, 8)
    decode = decode_side(torch.zeros_like(src))
    decode.table.reserve("bad", [0, 1, 2], 2, lease_s=60)
    real = gt.encode_chunk

    def corrupt(item):
        data = bytearray(real(item))
        if isinstance(item, gt.PageRef):  # a page (done chunks are protobuf messages)
            data[-1] ^= 0xFF  # flip bits in the payload's last byte
        return bytes(data)

    monkeypatch.setattr(gt, "encode_chunk", corrupt)
    sender.begin("bad", decode.endpoint)
    sender.send_layer("bad", src, 0, [3, 4, 5], [0, 1, 2])
    with pytest.raises(KVTransferError, match="DATA_LOSS|checksum"):
        sender.finish("bad", 1, 48, timeout_s=WAIT_S)
    transfer = decode.table.get("bad")
    assert transfer.state is TransferState.FAILED and decode.failed == [transfer]
    assert decode.ready == []
    decode.table.free("bad")
    assert decode.table.owned_blocks() == set()


def test_grpc_pages_for_unreserved_blocks_are_refused(decode_side, sender):
    src = _cache(1, 8)
    dst = torch.zeros_like(src)
    decode = decode_side(dst)
    decode.table.reserve("r", [0, 1], 1, lease_s=60)
    sender.begin("r", decode.endpoint)
    sender.send_layer("r", src, 0, [0, 1, 2], [0, 1, 5])  # block 5 is not r's
    with pytest.raises(KVTransferError, match="not reserved"):
        sender.finish("r", 1, 48, timeout_s=WAIT_S)
    assert not dst[:, :, 5].any()
    assert decode.table.get("r").state is TransferState.FAILED


# ---- collective transport between two Ray actors ------------------------------------------


def _decode_actor_cls():
    import ray

    @ray.remote(num_cpus=0.5, max_concurrency=4)
    class DecodeActor:
        """The four forwarding methods a decode worker exposes for the collective sender."""

        def __init__(self, layers: int, blocks: int, dtype: str):
            from kv_transfer.collective_transport import CollectiveKVReceiver

            self.kv = torch.zeros(_cache(layers, blocks).shape, dtype=getattr(torch, dtype))
            self.table = TransferTable()
            self.ready: list[str] = []
            self.receiver = CollectiveKVReceiver(
                self.kv, self.table, lambda t: self.ready.append(t.request_id)
            )

        def reserve(self, request_id, block_ids, layers):
            self.table.reserve(request_id, block_ids, layers, lease_s=60)

        def kv_join(self, group, backend):
            self.receiver.join(group, backend)

        def kv_leave(self, group):
            self.receiver.leave(group)

        def kv_recv_layer(self, group, header):
            self.receiver.recv_layer(group, header)

        def kv_done(self, request_id, first_token_id, num_prompt_tokens):
            return self.receiver.done(request_id, first_token_id, num_prompt_tokens)

        def read(self, block_ids):
            return self.kv[:, :, block_ids].clone(), list(self.ready)

    return DecodeActor


def _prefill_actor_cls():
    import ray

    @ray.remote(num_cpus=0.5)
    class PrefillActor:
        def __init__(self, name: str, backend: str | None = None):
            from kv_transfer.collective_transport import CollectiveKVSender

            self.sender = CollectiveKVSender(name, max_chunk_bytes=64 << 10, backend=backend)

        def prefill(self, request_id, decode, kv, src_ids, dst_ids):
            self.sender.begin(request_id, decode)
            for layer in range(kv.shape[0]):
                self.sender.send_layer(request_id, kv, layer, src_ids, dst_ids)
            self.sender.finish(request_id, 7, 16 * len(src_ids), timeout_s=WAIT_S)
            return True

        def close(self):
            self.sender.close()

    return PrefillActor


@pytest.mark.parametrize("backend", [None, "gloo"], ids=["kv_gloo-2-prefills", "ray-gloo-1-pair"])
def test_collective_pages_land_bit_identical(ray_session, backend):
    """Default (KV_GLOO): one decode actor fed by two prefill actors, each over its own group.
    ray's built-in "gloo" backend: a single pair (it binds the process's default group)."""
    ray = ray_session
    layers, blocks, n = 4, 64, 20
    decode = (
        _decode_actor_cls().options(name=f"decode-{backend}").remote(layers, blocks, "bfloat16")
    )
    prefills = [
        _prefill_actor_cls().remote(f"prefill-{i}", backend) for i in range(1 if backend else 2)
    ]
    jobs, expected = [], {}
    for i, prefill in enumerate(prefills):
        kv = _cache(layers, blocks, torch.bfloat16, seed=10 + i)
        src_ids = torch.randperm(blocks, generator=torch.Generator().manual_seed(i))[:n].tolist()
        dst_ids = list(range(i * n, (i + 1) * n))[::-1]
        ray.get(decode.reserve.remote(f"r{i}", dst_ids, layers), timeout=WAIT_S)
        jobs.append(prefill.prefill.remote(f"r{i}", f"decode-{backend}", kv, src_ids, dst_ids))
        expected[f"r{i}"] = (dst_ids, kv[:, :, src_ids])
    assert ray.get(jobs, timeout=45) == [True] * len(prefills)
    for request_id, (dst_ids, want) in expected.items():
        got, ready = ray.get(decode.read.remote(dst_ids), timeout=WAIT_S)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), request_id
    assert sorted(ready) == sorted(expected)
    ray.get([p.close.remote() for p in prefills], timeout=WAIT_S)
    for actor in [*prefills, decode]:
        ray.kill(actor)
