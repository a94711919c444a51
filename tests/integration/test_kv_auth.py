"""The KV-transfer port takes only pushes that prove a live reservation (real gRPC, loopback).

A forged push (no tag, a wrong tag, a tag for another request), a replay of a finished
transfer's push, and an abandoned push: refused or cancelled, counted, and no KV block
changes. KV over TLS: a sender that trusts the cluster's certificate lands pages; a
plaintext sender does not reach the server.
"""

from __future__ import annotations

import threading

import pytest
import torch
from tls_certs import self_signed

from kv_transfer.auth import new_secret, ticket_tag
from kv_transfer.errors import KVTransferError
from kv_transfer.grpc_sender import GrpcKVSender
from kv_transfer.grpc_transport import GrpcKVServer
from kv_transfer.state import TransferState, TransferTable
from kv_transfer.tls import KVTLS

WAIT_S = 20
SECRET = new_secret()


def _cache(blocks=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, 2, blocks, 4, 2, 8), generator=g)


class _Decode:
    def __init__(self, tls: KVTLS | None = None):
        self.kv = torch.zeros_like(_cache())
        self.table, self.ready = TransferTable(), threading.Event()
        self.server = GrpcKVServer(
            self.kv, self.table, lambda t: self.ready.set(), on_failed=lambda t: None, tls=tls
        )
        self.endpoint = self.server.start()

    def reserve(self, rid: str, blocks=(0, 1, 2)) -> str:
        tag = ticket_tag(SECRET, "decode-0", rid, rid.encode())
        self.table.reserve(rid, blocks, 2, lease_s=60, tag=tag)
        return tag


@pytest.fixture
def decode():
    d = _Decode()
    yield d
    d.server.stop()


@pytest.fixture
def sender():
    s = GrpcKVSender()
    yield s
    s.close()


def _push(sender, endpoint, rid, tag, src):
    sender.begin(rid, endpoint, tag)
    for layer in range(2):
        sender.send_layer(rid, src, layer, [3, 4, 5], [0, 1, 2])
    sender.finish(rid, 7, 12, timeout_s=WAIT_S)


@pytest.mark.parametrize("forged", ["", "0" * 64, "for-another-request"])
def test_a_forged_push_is_refused_counted_and_writes_nothing(decode, sender, forged):
    decode.reserve("victim")
    tag = (
        ticket_tag(SECRET, "decode-0", "other", b"other")
        if forged == "for-another-request"
        else forged
    )
    with pytest.raises(KVTransferError, match="PERMISSION_DENIED"):
        _push(sender, decode.endpoint, "victim", tag, _cache(seed=1))
    assert decode.server.refused == 1
    assert torch.count_nonzero(decode.kv) == 0  # no block written
    # the reservation itself is untouched: its real owner can still push
    assert decode.table.get("victim").state is TransferState.RESERVED
    assert decode.server.open_streams() == 0


def test_the_right_tag_lands_and_a_replay_is_refused(decode, sender):
    src = _cache(seed=2)
    tag = decode.reserve("r1")
    _push(sender, decode.endpoint, "r1", tag, src)
    assert decode.ready.wait(WAIT_S)
    assert torch.equal(decode.kv[:, :, 0:3], src[:, :, 3:6])
    decode.table.free("r1")  # the transfer is over; its blocks go on to another request
    before = decode.kv.clone()
    with pytest.raises(KVTransferError, match="PERMISSION_DENIED"):
        _push(sender, decode.endpoint, "r1", tag, _cache(seed=3))  # the same call, replayed
    assert decode.server.refused == 1
    assert torch.equal(decode.kv, before)


def test_a_released_reservation_cancels_its_open_push(decode, sender):
    tag = decode.reserve("gone")
    sender.begin("gone", decode.endpoint, tag)
    sender.send_layer("gone", _cache(seed=4), 0, [3, 4, 5], [0, 1, 2])
    deadline = threading.Event()
    for _ in range(100):  # the call is open once its first page is in
        if decode.server.open_streams() == 1:
            break
        deadline.wait(0.05)
    assert decode.server.open_streams() == 1
    decode.server.cancel("gone")  # what the decode worker does when the request ends
    decode.table.release("gone")
    with pytest.raises(KVTransferError):
        sender.finish("gone", 7, 12, timeout_s=WAIT_S)
    assert decode.server.open_streams() == 0
    assert decode.table.owned_blocks() == set()


def test_kv_over_tls(tmp_path):
    cert, key = self_signed(tmp_path, "kv")  # for 127.0.0.1, where the KV server listens
    tls = KVTLS.from_files(str(cert), str(key))
    decode = _Decode(tls)
    secure, plain = GrpcKVSender(tls=tls), GrpcKVSender()
    try:
        src = _cache(seed=5)
        _push(secure, decode.endpoint, "tls", decode.reserve("tls"), src)
        assert decode.ready.wait(WAIT_S)
        assert torch.equal(decode.kv[:, :, 0:3], src[:, :, 3:6])
        with pytest.raises(KVTransferError, match="UNAVAILABLE|no ack"):
            _push(plain, decode.endpoint, "plain", decode.reserve("plain", (4, 5, 6)), src)
    finally:
        secure.close()
        plain.close()
        decode.server.stop()


def test_unreadable_tls_files_are_a_one_line_error(tmp_path):
    from engine.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="cannot read the KV TLS certificate"):
        KVTLS.from_files(str(tmp_path / "missing.pem"), str(tmp_path / "missing.key"))
