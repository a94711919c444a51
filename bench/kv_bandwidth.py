"""How fast KV moves over the gRPC transport, against a raw TCP socket on the same machine.

    (a) GrpcKVSender ── Push(KVChunk pages) ──> GrpcKVServer: layer by layer, from one
        cache tensor into another (copy-out, crc32c both ends, protobuf framing, write-in)
    (b) socket.sendall ──> socket.recv_into: the same bytes, straight into the
        destination tensor's memory (the floor any transport pays on loopback)
    (c) bare gRPC: the same bytes as plain `bytes` messages of the same size on one
        client stream, no framing, checksum or bookkeeping; the receiver copies each
        into the destination. The most any transport built on grpcio's Python API
        can reach: it copies a message into a gRPC slice on send and out into a
        `bytes` on receive, two copies (a) and (c) pay and (b) does not.

The receiver runs in its own process, as a decode worker does, so sender and
receiver do not share a GIL; time runs from the first byte to the receiver's ack.
Each path runs one untimed full-size round (a server has warm channels and heaps),
then ROUNDS timed ones, the three paths taking turns; each path's median counts.
Run: python -m bench.kv_bandwidth [total_MiB]  (or: splitserve bench kv --mib N)
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import grpc
import torch

from engine.heap import retain_freed_memory
from kv_transfer.grpc_transport import GRPC_OPTIONS, GrpcKVSender, GrpcKVServer
from kv_transfer.pages import DEFAULT_MAX_CHUNK_BYTES, payload_checksum, payload_view
from kv_transfer.state import TransferTable

# a layer's pages: [2, 64 blocks, 16 tokens, 8 kv heads, 128 head dim] f32 = 8 MiB
_BLOCKS, _BLOCK_SIZE, _KV_HEADS, _HEAD_DIM = 64, 16, 8, 128


def _shape(total_bytes: int) -> tuple[int, ...]:
    layer_bytes = 2 * _BLOCKS * _BLOCK_SIZE * _KV_HEADS * _HEAD_DIM * 4
    return (max(1, total_bytes // layer_bytes), 2, _BLOCKS, _BLOCK_SIZE, _KV_HEADS, _HEAD_DIM)


def _crc(t: torch.Tensor) -> int:
    return payload_checksum(payload_view(t))


def _check_landed(conn: Connection, src: torch.Tensor, path: str) -> None:
    """Ask the receiver for its destination's checksum after a round; it must match src's."""
    conn.send("check")
    if conn.recv() != _crc(src):
        raise RuntimeError(f"{path} bench: bytes did not land intact")


ROUNDS = 5  # timed rounds per path, after one untimed full-size round; the median counts


def _receiver(target, *args) -> tuple[BaseProcess, Connection]:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=target, args=(*args, child))
    proc.start()
    return proc, parent


def _grpc_receiver(shape, conn) -> None:
    torch.set_num_threads(1)
    dst, table, landed = torch.zeros(shape), TransferTable(), threading.Event()
    server = GrpcKVServer(dst, table, lambda _t: landed.set())
    conn.send(server.start())
    while (request_id := conn.recv()) is not None:  # one reservation per round
        landed.clear()
        dst.zero_()
        table.reserve(request_id, list(range(shape[2])), shape[0], lease_s=600)
        conn.send("reserved")
        conn.recv()  # the sender has its ack
        conn.send(_crc(dst) if landed.wait(600) else None)
        table.release(request_id)
    server.stop()


def _grpc_rounds(src: torch.Tensor, max_chunk_bytes: int) -> Iterator[float]:
    """Seconds per round, one Push of every layer each, from begin to the receiver's ack."""
    proc, conn = _receiver(_grpc_receiver, src.shape)
    endpoint = conn.recv()
    sender = GrpcKVSender(max_chunk_bytes)
    blocks = list(range(src.shape[2]))
    try:
        for i in itertools.count():
            request_id = f"bench-{i}"
            conn.send(request_id)
            conn.recv()
            start = time.perf_counter()
            sender.begin(request_id, endpoint)
            for layer in range(src.shape[0]):
                sender.send_layer(request_id, src, layer, blocks, blocks)
            sender.finish(request_id, 0, 1, timeout_s=600)  # returns on the ack
            elapsed = time.perf_counter() - start
            _check_landed(conn, src, "gRPC")
            yield elapsed
    finally:
        conn.send(None)
        sender.close()
        proc.join(30)


_BARE_METHOD = "/splitserve.bench.Bare/Push"


def _identity(data: bytes) -> bytes:
    return data


def _bare_grpc_receiver(shape, conn) -> None:
    """A server whose Push copies each message into `dst` in order, and acks the count."""
    retain_freed_memory()
    dst = torch.zeros(shape)
    into = payload_view(dst)

    def push(messages, _context) -> bytes:
        got = 0
        for message in messages:
            into[got : got + len(message)] = message
            got += len(message)
        return got.to_bytes(8, "little")

    server = grpc.server(futures.ThreadPoolExecutor(4), options=GRPC_OPTIONS)
    handler = grpc.stream_unary_rpc_method_handler(
        push, request_deserializer=_identity, response_serializer=_identity
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("splitserve.bench.Bare", {"Push": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    while conn.recv() is not None:  # "check" after each round
        conn.send(_crc(dst))
        dst.zero_()
    server.stop(1.0)


def _bare_grpc_rounds(src: torch.Tensor, chunk_bytes: int) -> Iterator[float]:
    """Seconds per round: one Push of `src` as chunk_bytes messages, to the server's reply."""
    out = payload_view(src)
    proc, conn = _receiver(_bare_grpc_receiver, src.shape)
    channel = grpc.insecure_channel(f"127.0.0.1:{conn.recv()}", options=GRPC_OPTIONS)
    push = channel.stream_unary(
        _BARE_METHOD, request_serializer=_identity, response_deserializer=_identity
    )
    try:
        while True:
            start = time.perf_counter()
            # bytes(): the one copy a message needs to exist as the `bytes` grpcio sends
            push(bytes(out[o : o + chunk_bytes]) for o in range(0, out.nbytes, chunk_bytes))
            elapsed = time.perf_counter() - start
            _check_landed(conn, src, "bare gRPC")
            yield elapsed
    finally:
        conn.send(None)
        channel.close()
        proc.join(30)


def _socket_receiver(shape, chunk_bytes: int, conn) -> None:
    dst = torch.zeros(shape)
    into = payload_view(dst)
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
    while conn.recv() is not None:  # "go" before each round
        dst.zero_()
        peer, _ = listener.accept()
        with peer:
            got = 0
            while got < into.nbytes:
                n = peer.recv_into(into[got:], min(chunk_bytes, into.nbytes - got))
                if n == 0:
                    raise RuntimeError("socket bench: peer closed early")
                got += n
            peer.sendall(b"k")  # the ack
        conn.recv()  # "check"
        conn.send(_crc(dst))
    listener.close()


def _socket_rounds(src: torch.Tensor, chunk_bytes: int) -> Iterator[float]:
    """Seconds per round, from connect to the receiver's ack of the last byte."""
    out = payload_view(src)
    proc, conn = _receiver(_socket_receiver, src.shape, chunk_bytes)
    port = conn.recv()
    try:
        while True:
            conn.send("go")
            start = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port)) as peer:
                for offset in range(0, out.nbytes, chunk_bytes):
                    peer.sendall(out[offset : offset + chunk_bytes])
                peer.recv(1)
            elapsed = time.perf_counter() - start
            _check_landed(conn, src, "socket")
            yield elapsed
    finally:
        conn.send(None)
        proc.join(30)


def _interleaved_medians(paths: dict[str, Iterator[float]]) -> dict[str, float]:
    """Median seconds of each path over ROUNDS rounds, the paths taking turns in each
    round so that a slow spell of the machine hits them all alike."""
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for _ in range(1 + ROUNDS):  # round 0 warms up the channels and the heaps
            for name, rounds in paths.items():
                seconds[name].append(next(rounds))
    finally:
        for rounds in paths.values():
            rounds.close()  # type: ignore[attr-defined]
    return {name: statistics.median(s[1:]) for name, s in seconds.items()}


def measure_grpc_bandwidth(
    total_bytes: int = 256 << 20, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> dict[str, float]:
    """GB/s of (a) gRPC KV transfer, (b) a raw TCP socket and (c) bare gRPC, same bytes;
    ratio = (a)/(b), bare_ratio = (c)/(b) (the ceiling for ratio), of_bare = (a)/(c)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # as in a worker actor (set_threads); 2 OpenMP threads copy at 0.5 GB/s here
    try:
        src = torch.randn(_shape(total_bytes))
        nbytes = src.numel() * src.element_size()
        medians = _interleaved_medians(
            {
                "grpc": _grpc_rounds(src, max_chunk_bytes),
                "socket": _socket_rounds(src, max_chunk_bytes),
                "bare": _bare_grpc_rounds(src, max_chunk_bytes),
            }
        )
        grpc_s, socket_s, bare_s = medians["grpc"], medians["socket"], medians["bare"]
    finally:
        torch.set_num_threads(threads)
    grpc_gbps, socket_gbps = nbytes / grpc_s / 1e9, nbytes / socket_s / 1e9
    bare_gbps = nbytes / bare_s / 1e9
    return {
        "bytes": float(nbytes),
        "grpc_gbps": grpc_gbps,
        "socket_gbps": socket_gbps,
        "bare_grpc_gbps": bare_gbps,
        "ratio": grpc_gbps / socket_gbps,
        "bare_ratio": bare_gbps / socket_gbps,
        "of_bare": grpc_gbps / bare_gbps,
    }


if __name__ == "__main__":
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    result = measure_grpc_bandwidth(mib << 20)
    print(" ".join(f"{k}={v:.3f}" for k, v in result.items()))
