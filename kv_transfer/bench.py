"""How fast KV moves over the gRPC transport, against a raw TCP socket on the same machine.

    (a) GrpcKVSender ── Push(KVChunk pages) ──> GrpcKVServer: layer by layer, from one
        cache tensor into another (copy-out, crc32 both ends, protobuf framing, write-in)
    (b) socket.sendall ──> socket.recv_into: the same bytes, straight into the
        destination tensor's memory (the floor any transport pays on loopback)

Both run in one process (sender and receiver on threads), over 127.0.0.1.
Run: python -m kv_transfer.bench [total_MiB]
"""

from __future__ import annotations

import socket
import sys
import threading
import time

import torch

from kv_transfer.grpc_transport import GrpcKVSender, GrpcKVServer
from kv_transfer.pages import DEFAULT_MAX_CHUNK_BYTES
from kv_transfer.state import TransferTable

# a layer's pages: [2, 64 blocks, 16 tokens, 8 kv heads, 128 head dim] f32 = 8 MiB
_BLOCKS, _BLOCK_SIZE, _KV_HEADS, _HEAD_DIM = 64, 16, 8, 128


def _caches(total_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    layer_bytes = 2 * _BLOCKS * _BLOCK_SIZE * _KV_HEADS * _HEAD_DIM * 4
    layers = max(1, total_bytes // layer_bytes)
    shape = (layers, 2, _BLOCKS, _BLOCK_SIZE, _KV_HEADS, _HEAD_DIM)
    return torch.randn(shape), torch.zeros(shape)


def _grpc_seconds(src: torch.Tensor, dst: torch.Tensor, max_chunk_bytes: int) -> float:
    table, landed = TransferTable(), threading.Event()
    server = GrpcKVServer(dst, table, lambda _t: landed.set())
    endpoint = server.start()
    sender = GrpcKVSender(max_chunk_bytes)
    blocks = list(range(src.shape[2]))
    try:
        for i, timed in enumerate((False, True)):  # first round warms up the channel
            request_id = f"bench-{i}"
            table.reserve(request_id, blocks, src.shape[0], lease_s=600)
            layers = range(src.shape[0]) if timed else range(1)
            start = time.perf_counter()
            sender.begin(request_id, endpoint)
            for layer in layers:
                sender.send_layer(request_id, src, layer, blocks, blocks)
            if timed:
                sender.finish(request_id, 0, 1, timeout_s=600)
            else:
                sender.abort(request_id)
            elapsed = time.perf_counter() - start
            table.release(request_id)
        if not (landed.is_set() and torch.equal(src, dst)):
            raise RuntimeError("gRPC bench: pages did not land intact")
        return elapsed
    finally:
        sender.close()
        server.stop()


def _socket_seconds(src: torch.Tensor, dst: torch.Tensor, chunk_bytes: int) -> float:
    out = memoryview(src.view(torch.uint8).reshape(-1).numpy())  # type: ignore[arg-type]
    into = memoryview(dst.view(torch.uint8).reshape(-1).numpy())  # type: ignore[arg-type]
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def receive() -> None:
        conn, _ = listener.accept()
        with conn:
            got = 0
            while got < into.nbytes:
                n = conn.recv_into(into[got:], min(chunk_bytes, into.nbytes - got))
                if n == 0:
                    raise RuntimeError("socket bench: peer closed early")
                got += n

    receiver = threading.Thread(target=receive, name="bench-recv")
    receiver.start()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        for offset in range(0, out.nbytes, chunk_bytes):
            conn.sendall(out[offset : offset + chunk_bytes])
        receiver.join(timeout=600)
    elapsed = time.perf_counter() - start
    listener.close()
    if not torch.equal(src, dst):
        raise RuntimeError("socket bench: bytes did not land intact")
    return elapsed


def measure_grpc_bandwidth(
    total_bytes: int = 256 << 20, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> dict[str, float]:
    """GB/s of (a) gRPC KV transfer and (b) a raw TCP socket, same bytes, and (a)/(b)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # as in a worker actor (set_threads); 2 OpenMP threads copy at 0.5 GB/s here
    try:
        src, dst = _caches(total_bytes)
        nbytes = src.numel() * src.element_size()
        grpc_s = _grpc_seconds(src, dst, max_chunk_bytes)
        dst.zero_()
        socket_s = _socket_seconds(src, dst, max_chunk_bytes)
    finally:
        torch.set_num_threads(threads)
    grpc_gbps, socket_gbps = nbytes / grpc_s / 1e9, nbytes / socket_s / 1e9
    return {
        "bytes": float(nbytes),
        "grpc_gbps": grpc_gbps,
        "socket_gbps": socket_gbps,
        "ratio": grpc_gbps / socket_gbps,
    }


if __name__ == "__main__":
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    result = measure_grpc_bandwidth(mib << 20)
    print(" ".join(f"{k}={v:.3f}" for k, v in result.items()))
