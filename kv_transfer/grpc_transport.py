"""KV transfer over gRPC: one client-streaming Push call per request.

    prefill worker (GrpcKVSender)                    decode worker (GrpcKVServer)
    begin(id, "host:port") ── opens Push ─────────>  handler thread for the call
    send_layer(id, kv, l, src, dst)                  for each KVChunk{page}:
      gather kv[l, :, src] straight into KVChunk       crc32c/dtype/shape check,
      messages, crc32c (caller's thread), enqueue;     table.landing(header) (blocks reserved?),
      gRPC's stream thread sends ─ KVChunk{page} ──>   write into kv[l, :, dst] (one copy)
    finish(id, token, n) ─── KVChunk{done} ──────>   table.on_done -> READY: on_ready(transfer)
      waits for the reply <── PushReply{READY} ────                  FAILED: on_failed(transfer)
    any error: KVTransferError in the prefill;       bad page / unknown request: transfer
      its own KV is released by its owner            FAILED, call aborted with a status

Pages are framed by kv_transfer.grpc_codec: gathered once into the message on
send, viewed (not copied) on receive; the bytes on the wire are ordinary KVChunks.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures

import grpc
import torch

from kv_transfer.errors import (
    ChecksumMismatchError,
    IllegalTransitionError,
    KVTransferError,
    UnknownTransferError,
)
from kv_transfer.grpc_codec import (
    InboundPage,
    decode_chunk,
    encode_chunk,
    encode_page,
    header_from_proto,
)
from kv_transfer.heap import retain_freed_memory
from kv_transfer.pages import (
    DEFAULT_MAX_CHUNK_BYTES,
    block_chunks,
    block_nbytes,
    check_page,
    write_pages,
)
from kv_transfer.state import KVTransfer, TransferState, TransferTable
from splitserve_proto import kv_transfer_pb2 as pb
from splitserve_proto import kv_transfer_pb2_grpc as pb_grpc

PUSH_METHOD = "/splitserve.kv.v1.KVTransfer/Push"
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


def _status_for(error: KVTransferError) -> grpc.StatusCode:
    if isinstance(error, ChecksumMismatchError):
        return grpc.StatusCode.DATA_LOSS
    if isinstance(error, UnknownTransferError | IllegalTransitionError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INVALID_ARGUMENT


class GrpcKVServer(pb_grpc.KVTransferServicer):
    """Receives Push calls inside the decode worker and lands pages in its cache."""

    def __init__(
        self,
        kv_cache: torch.Tensor,
        table: TransferTable,
        on_ready: Callable[[KVTransfer], None],
        host: str = "127.0.0.1",
        port: int = 0,
        max_workers: int = 4,
        on_failed: Callable[[KVTransfer], None] | None = None,
    ) -> None:
        retain_freed_memory()  # received messages: reuse heap memory, no page faults per chunk
        self.kv_cache = kv_cache
        self.table = table
        self.on_ready = on_ready
        self.on_failed = on_failed
        self.host = host
        self.port = port
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers, thread_name_prefix="kv-recv"),
            options=GRPC_OPTIONS,
        )
        push = grpc.stream_unary_rpc_method_handler(
            self.Push,
            request_deserializer=decode_chunk,
            response_serializer=pb.PushReply.SerializeToString,
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("splitserve.kv.v1.KVTransfer", {"Push": push}),)
        )
        self.endpoint = ""

    def start(self) -> str:
        bound = self._server.add_insecure_port(f"{self.host}:{self.port}")
        if bound == 0:
            raise KVTransferError(f"cannot bind the KV server to {self.host}:{self.port}")
        self._server.start()
        self.port = bound
        self.endpoint = f"{self.host}:{bound}"
        return self.endpoint

    def stop(self, grace_s: float = 1.0) -> None:
        self._server.stop(grace_s).wait(grace_s + 1.0)

    def close(self) -> None:
        self.stop()

    def Push(  # noqa: N802
        self, request_iterator: Iterator[pb.KVChunk | InboundPage], context
    ) -> pb.PushReply:
        request_id, pages, nbytes = "", 0, 0
        try:
            for chunk in request_iterator:
                if isinstance(chunk, pb.KVChunk) and chunk.WhichOneof("kind") == "page":
                    chunk = InboundPage(chunk.page, memoryview(chunk.page.payload))
                if isinstance(chunk, InboundPage):
                    request_id = chunk.header.request_id
                    nbytes += self._land(chunk.header, chunk.payload)
                    pages += 1
                elif chunk.WhichOneof("kind") == "done":
                    done = chunk.done
                    transfer = self.table.on_done(
                        done.request_id, done.first_token_id, done.num_prompt_tokens
                    )
                    state = transfer.state  # the owner may move it on in _announce
                    self._announce(transfer)
                    if state is not TransferState.READY:
                        raise KVTransferError(f"{done.request_id}: {transfer.failure_reason}")
                    return pb.PushReply(
                        request_id=done.request_id,
                        state=state.name,
                        pages_received=pages,
                        bytes_received=nbytes,
                    )
            raise KVTransferError(f"{request_id}: stream ended before done")
        except KVTransferError as error:
            failed = self.table.fail(request_id, str(error)) if request_id else None
            if failed is not None:
                self._announce(failed)
            context.abort(_status_for(error), str(error))
            raise AssertionError("unreachable: context.abort raises") from error

    def _land(self, page: pb.KVPage, payload: memoryview) -> int:
        header = header_from_proto(page)
        check_page(self.kv_cache, header, payload)
        with self.table.landing(header):
            write_pages(self.kv_cache, header, payload, verify=False)
        return payload.nbytes

    def _announce(self, transfer: KVTransfer) -> None:
        if transfer.state is TransferState.READY:
            self.on_ready(transfer)
        elif self.on_failed is not None:
            self.on_failed(transfer)


class _Push:
    """One request's open Push call: an outbound queue that gRPC's stream thread drains."""

    _END = object()

    def __init__(self, call: grpc.StreamUnaryMultiCallable) -> None:
        self.outbound: queue.SimpleQueue = queue.SimpleQueue()
        self.future = call.future(iter(self.outbound.get, self._END))

    def close_outbound(self) -> None:
        self.outbound.put(self._END)


class GrpcKVSender:
    """Streams a request's pages to a decode worker's GrpcKVServer, layer by layer."""

    def __init__(self, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> None:
        retain_freed_memory()  # encoded messages: reuse heap memory
        self.max_chunk_bytes = max_chunk_bytes
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[grpc.Channel, grpc.StreamUnaryMultiCallable]] = {}
        self._pushes: dict[str, _Push] = {}

    def _call(self, endpoint: str) -> grpc.StreamUnaryMultiCallable:
        with self._lock:
            if endpoint not in self._channels:
                channel = grpc.insecure_channel(endpoint, options=GRPC_OPTIONS)
                call = channel.stream_unary(
                    PUSH_METHOD,
                    request_serializer=encode_chunk,
                    response_deserializer=pb.PushReply.FromString,
                )
                self._channels[endpoint] = (channel, call)
            return self._channels[endpoint][1]

    def begin(self, request_id: str, endpoint: str) -> None:
        push = _Push(self._call(endpoint))
        with self._lock:
            if request_id in self._pushes:
                push.future.cancel()
                push.close_outbound()
                raise KVTransferError(f"{request_id}: transfer already begun")
            self._pushes[request_id] = push

    def _push(self, request_id: str) -> _Push:
        with self._lock:
            push = self._pushes.get(request_id)
        if push is None:
            raise KVTransferError(f"{request_id}: no transfer begun")
        return push

    def send_layer(
        self,
        request_id: str,
        kv_cache: torch.Tensor,
        layer: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
    ) -> None:
        """Copy layer `layer`'s pages into their messages now; they are sent in the background."""
        push = self._push(request_id)
        if push.future.done():  # the call already failed: stop computing for nothing
            self._raise_for(request_id, push, timeout_s=0.0)
        if len(src_block_ids) != len(dst_block_ids):
            raise KVTransferError(f"{request_id}: {len(src_block_ids)} src vs {len(dst_block_ids)}")
        for run in block_chunks(len(src_block_ids), block_nbytes(kv_cache), self.max_chunk_bytes):
            src = [src_block_ids[i] for i in run]
            dst = [dst_block_ids[i] for i in run]
            push.outbound.put(encode_page(request_id, kv_cache, layer, src, dst))

    def finish(
        self, request_id: str, first_token_id: int, num_prompt_tokens: int, timeout_s: float = 30
    ) -> None:
        """Send done and wait for the decode worker's ack; KVTransferError if it is not READY."""
        push = self._push(request_id)
        done = pb.KVDone(
            request_id=request_id,
            first_token_id=first_token_id,
            num_prompt_tokens=num_prompt_tokens,
        )
        push.outbound.put(pb.KVChunk(done=done))
        push.close_outbound()
        self._raise_for(request_id, push, timeout_s)

    def _raise_for(self, request_id: str, push: _Push, timeout_s: float) -> None:
        """Wait for the call's reply; drop the push, and raise unless the reply is READY."""
        try:
            reply = push.future.result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            self.abort(request_id)
            raise KVTransferError(f"{request_id}: no ack in {timeout_s}s") from None
        except grpc.FutureCancelledError:
            self.abort(request_id)
            raise KVTransferError(f"{request_id}: KV push cancelled") from None
        except grpc.RpcError as error:
            self.abort(request_id)
            raise KVTransferError(
                f"{request_id}: KV push failed: {error.code().name}: {error.details()}"
            ) from error
        self._forget(request_id)
        if reply.state != TransferState.READY.name:
            raise KVTransferError(f"{request_id}: decode worker ended the transfer {reply.state}")

    def _forget(self, request_id: str) -> _Push | None:
        with self._lock:
            return self._pushes.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Cancel a request's call (the decode worker fails its transfer)."""
        push = self._forget(request_id)
        if push is not None:
            push.future.cancel()
            push.close_outbound()

    def close(self) -> None:
        with self._lock:
            request_ids = list(self._pushes)
        for request_id in request_ids:
            self.abort(request_id)
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel, _ in channels:
            channel.close()
