"""KV transfer over gRPC: one client-streaming Push call per request.

    prefill worker (GrpcKVSender)                    decode worker (GrpcKVServer)
    begin(id, "host:port", tag): noted
    first send_layer ── opens Push (metadata: tag) ─> handler thread for the call;
                                                     tag == the reservation's? else refused
    send_layer(id, kv, l, src, dst): queued          for each KVChunk{page}:
      gRPC's stream thread, per chunk: gather          dtype/shape check,
      kv[l, :, src] into the message + crc32c,         table.landing(header) (blocks reserved?),
      send ─────────────── KVChunk{page} ──────────>   write into kv[l, :, dst] (one copy) + crc32c
    finish(id, token, n) ─── KVChunk{done} ──────>   table.on_done -> READY: on_ready(transfer)
      waits for the reply <── PushReply{READY} ────                  FAILED: on_failed(transfer)
    any error: KVTransferError in the prefill;       bad page / unknown request / client
      its own KV is released by its owner            gone: transfer FAILED, call aborted
    abort(id): call cancelled                        cancel(id) (reservation released):
                                                     the call is cancelled, its thread freed

The Push opens when the prompt's first layer is computed, not while it waits in the
prefill queue, so a handler thread is busy only while pages flow; calls past
MAX_PUSHES get RESOURCE_EXHAUSTED at once (the router retries elsewhere).

The sender is kv_transfer.grpc_sender. Pages are framed by kv_transfer.grpc_codec: gathered
once into the message on send, viewed (not copied) on receive; the bytes on the wire are
ordinary KVChunks. kv_transfer.page_copy sums each slice of a payload as it is copied,
while it is in cache: a bad sum fails the transfer after its (reserved) blocks were written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import torch

from engine.heap import retain_freed_memory
from kv_transfer.auth import TAG_METADATA, tags_match
from kv_transfer.errors import (
    ChecksumMismatchError,
    IllegalTransitionError,
    KVTransferError,
    UnknownTransferError,
)
from kv_transfer.grpc_codec import InboundPage, decode_chunk, header_from_proto
from kv_transfer.grpc_sender import GRPC_OPTIONS, GrpcKVSender
from kv_transfer.page_copy import land_page
from kv_transfer.pages import check_page
from kv_transfer.state import KVTransfer, TransferState, TransferTable
from kv_transfer.tls import KVTLS
from splitserve_proto import kv_transfer_pb2 as pb
from splitserve_proto import kv_transfer_pb2_grpc as pb_grpc

MAX_PUSHES = 64  # concurrent Push calls one KV server serves


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
        max_workers: int = MAX_PUSHES,
        on_failed: Callable[[KVTransfer], None] | None = None,
        tls: KVTLS | None = None,
    ) -> None:
        retain_freed_memory()  # received messages: reuse heap memory, no page faults per chunk
        self.kv_cache = kv_cache
        self.table = table
        self.on_ready = on_ready
        self.on_failed = on_failed
        self.host = host
        self.port = port
        self.tls = tls
        self.refused = 0  # pushes without a valid tag for a live reservation
        self._lock = threading.Lock()
        self._calls: dict[str, grpc.ServicerContext] = {}  # request id -> its open Push
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers, thread_name_prefix="kv-recv"),
            options=GRPC_OPTIONS,
            maximum_concurrent_rpcs=max_workers,
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
        address = f"{self.host}:{self.port}"
        if self.tls is None:
            bound = self._server.add_insecure_port(address)
        else:
            bound = self._server.add_secure_port(address, self.tls.server_credentials())
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

    def open_streams(self) -> int:
        with self._lock:
            return len(self._calls)

    def cancel(self, request_id: str) -> None:
        """The reservation is gone: end its Push (if open) so its handler thread is freed."""
        with self._lock:
            context = self._calls.pop(request_id, None)
        if context is not None:
            context.cancel()

    def _admit(self, request_id: str, context) -> None:
        """The first message of a call: it must carry the tag of a live reservation."""
        tag = dict(context.invocation_metadata()).get(TAG_METADATA, "")
        transfer = self.table.get(request_id)
        if transfer is None or not tags_match(transfer.tag, tag):
            with self._lock:
                self.refused += 1
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{request_id}: no such reservation")
        with self._lock:
            self._calls[request_id] = context

    def Push(  # noqa: N802
        self, request_iterator: Iterator[pb.KVChunk | InboundPage], context
    ) -> pb.PushReply:
        request_id, pages, nbytes = "", 0, 0
        try:
            for chunk in request_iterator:
                if isinstance(chunk, pb.KVChunk) and chunk.WhichOneof("kind") == "page":
                    chunk = InboundPage(chunk.page, memoryview(chunk.page.payload))
                rid = (
                    chunk.header.request_id
                    if isinstance(chunk, InboundPage)
                    else chunk.done.request_id
                )
                if not request_id:
                    self._admit(rid, context)  # aborts the call unless authorized
                    request_id = rid
                elif rid != request_id:
                    raise KVTransferError(f"{request_id}: a message for {rid} in its call")
                if isinstance(chunk, InboundPage):
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
            self._fail(request_id, str(error))
            context.abort(_status_for(error), str(error))
            raise AssertionError("unreachable: context.abort raises") from error
        except Exception as error:  # the sender went away or cancelled (or a refusal's abort)
            self._fail(request_id, f"push ended: {error!r}")
            raise
        finally:
            with self._lock:
                if self._calls.get(request_id) is context:
                    del self._calls[request_id]

    def _fail(self, request_id: str, reason: str) -> None:
        failed = self.table.fail(request_id, reason) if request_id else None
        if failed is not None:
            self._announce(failed)

    def _land(self, page: pb.KVPage, payload: memoryview) -> int:
        header = header_from_proto(page)
        check_page(self.kv_cache, header, payload, checksum=False)  # land_page sums it
        with self.table.landing(header):
            land_page(self.kv_cache, header, payload)
        return payload.nbytes

    def _announce(self, transfer: KVTransfer) -> None:
        if transfer.state is TransferState.READY:
            self.on_ready(transfer)
        elif self.on_failed is not None:
            self.on_failed(transfer)


__all__ = ["GRPC_OPTIONS", "GrpcKVSender", "GrpcKVServer"]
