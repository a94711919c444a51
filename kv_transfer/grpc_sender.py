"""The prefill side of KV over gRPC (see kv_transfer.grpc_transport for the whole picture).

begin(id, endpoint, tag) ── noted; nothing opened yet (the prompt may still be queued)
send_layer(id, ...) ── first call opens Push(metadata: tag, deadline) ── pages enqueued;
                        gRPC's stream thread gathers each chunk as it sends it
finish(id, ...) ── done enqueued, outbound closed, wait for PushReply{READY}
abort(id) / close() ── call cancelled: the decode worker fails and frees the transfer
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

import grpc
import torch

from engine.heap import retain_freed_memory
from kv_transfer.auth import TAG_METADATA
from kv_transfer.errors import KVTransferError
from kv_transfer.grpc_codec import PageRef, encode_chunk
from kv_transfer.pages import DEFAULT_MAX_CHUNK_BYTES, block_chunks, block_nbytes
from kv_transfer.state import TransferState
from kv_transfer.tls import KVTLS
from splitserve_proto import kv_transfer_pb2 as pb

PUSH_METHOD = "/splitserve.kv.v1.KVTransfer/Push"
PUSH_TIMEOUT_S = 120.0  # deadline of one Push call: a prompt's pages and the ack
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


class _Push:
    """One request's Push: opened at its first message, then an outbound queue that gRPC's
    stream thread drains. The call's deadline bounds a peer that stops answering."""

    _END = object()

    def __init__(self, endpoint: str, tag: str, timeout_s: float) -> None:
        self.endpoint, self.tag, self.timeout_s = endpoint, tag, timeout_s
        self.outbound: queue.SimpleQueue = queue.SimpleQueue()
        self.future: grpc.Future | None = None

    def open(self, call: grpc.StreamUnaryMultiCallable) -> grpc.Future:
        if self.future is None:
            self.future = call.future(
                iter(self.outbound.get, self._END),
                timeout=self.timeout_s,
                metadata=((TAG_METADATA, self.tag),),
            )
        return self.future

    def close_outbound(self) -> None:
        self.outbound.put(self._END)


class GrpcKVSender:
    """Streams a request's pages to a decode worker's GrpcKVServer, layer by layer."""

    def __init__(
        self,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        tls: KVTLS | None = None,
        call_timeout_s: float = PUSH_TIMEOUT_S,
    ) -> None:
        retain_freed_memory()  # encoded messages: reuse heap memory
        self.max_chunk_bytes = max_chunk_bytes
        self.tls, self.call_timeout_s = tls, call_timeout_s
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[grpc.Channel, grpc.StreamUnaryMultiCallable]] = {}
        self._pushes: dict[str, _Push] = {}

    def _call(self, endpoint: str) -> grpc.StreamUnaryMultiCallable:
        with self._lock:
            if endpoint not in self._channels:
                channel = self._channel(endpoint)
                call = channel.stream_unary(
                    PUSH_METHOD,
                    request_serializer=encode_chunk,
                    response_deserializer=pb.PushReply.FromString,
                )
                self._channels[endpoint] = (channel, call)
            return self._channels[endpoint][1]

    def _channel(self, endpoint: str) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(endpoint, options=GRPC_OPTIONS)
        options: list[tuple[str, int | str]] = list(GRPC_OPTIONS)
        if self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return grpc.secure_channel(endpoint, self.tls.channel_credentials(), options=options)

    def begin(self, request_id: str, endpoint: str, tag: str = "") -> None:
        """Note where a request's pages go; its call opens with its first page."""
        with self._lock:
            if request_id in self._pushes:
                raise KVTransferError(f"{request_id}: transfer already begun")
            self._pushes[request_id] = _Push(endpoint, tag, self.call_timeout_s)

    def open_streams(self) -> int:
        """Pushes begun and not yet acked or aborted (for leak checks)."""
        with self._lock:
            return len(self._pushes)

    def _push(self, request_id: str) -> tuple[_Push, grpc.Future]:
        with self._lock:
            push = self._pushes.get(request_id)
        if push is None:
            raise KVTransferError(f"{request_id}: no transfer begun (aborted)")
        return push, push.open(self._call(push.endpoint))

    def send_layer(
        self,
        request_id: str,
        kv_cache: torch.Tensor,
        layer: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
    ) -> None:
        """Queue layer `layer`'s pages: gRPC's stream thread gathers each chunk into its
        message as it sends it, in order. The caller keeps the source blocks until
        finish() returns. After abort() one chunk already taken may still read them: its
        call is cancelled, so what it read is never used. A block sent again later (the
        partial last block of a prefill chunk) lands last, with the later contents."""
        push, future = self._push(request_id)
        if future.done():  # the call already failed: stop computing for nothing
            self._raise_for(request_id, future, timeout_s=0.0)
        if len(src_block_ids) != len(dst_block_ids):
            raise KVTransferError(f"{request_id}: {len(src_block_ids)} src vs {len(dst_block_ids)}")
        for run in block_chunks(len(src_block_ids), block_nbytes(kv_cache), self.max_chunk_bytes):
            src = [src_block_ids[i] for i in run]
            dst = [dst_block_ids[i] for i in run]
            push.outbound.put(PageRef(request_id, kv_cache, layer, src, dst))

    def finish(
        self, request_id: str, first_token_id: int, num_prompt_tokens: int, timeout_s: float = 30
    ) -> None:
        """Send done and wait for the decode worker's ack; KVTransferError if it is not READY."""
        push, future = self._push(request_id)
        done = pb.KVDone(
            request_id=request_id,
            first_token_id=first_token_id,
            num_prompt_tokens=num_prompt_tokens,
        )
        push.outbound.put(pb.KVChunk(done=done))
        push.close_outbound()
        self._raise_for(request_id, future, timeout_s)

    def _raise_for(self, request_id: str, future: grpc.Future, timeout_s: float) -> None:
        """Wait for the call's reply; drop the push, and raise unless the reply is READY."""
        try:
            reply = future.result(timeout=timeout_s)
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
            if push.future is not None:
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
