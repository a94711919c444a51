"""KV transfer over ray.util.collective: gloo on CPU (backend KV_GLOO), NCCL on GPUs.

send/recv must meet on both sides, so the prefill side drives the decode side
with Ray actor calls. The decode worker actor embeds a CollectiveKVReceiver and
exposes four methods that forward to it (and run it off its event loop/thread,
e.g. `await asyncio.to_thread(...)` in an async actor, as recv blocks):

    kv_join(group, backend) -> receiver.join     kv_recv_layer(group, header) -> receiver.recv_layer
    kv_leave(group)         -> receiver.leave    kv_done(id, token, n)       -> receiver.done

    prefill P: CollectiveKVSender(name)                decode D (actor "decode-0")
    begin(id, "decode-0")      first use of D: group "kv/P->D/<nonce>", 2 ranks
       D.kv_join.remote(group) ‖ init_collective_group(rank 0) ─ rendezvous ─ rank 1
    send_layer(id, kv, l, src, dst): copy pages out, enqueue to D's sender thread:
       ref = D.kv_recv_layer.remote(group, header) ──────> recv into a buffer of header.shape
       col.send(pages, dst_rank=1, group) ═══ tensor ═══>  crc32 (CPU), table.landing, write
       ray.get(ref): an error fails the request
    finish(id, token, n): after its pages, D.kv_done.remote ──> READY -> on_ready | FAILED
    close(), or any send error: both sides destroy the group (next use makes a new one)

The nonce keeps a re-made group from meeting a stale rendezvous address left by
a crashed incarnation of the same pair.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import ray
import ray.util.collective as col
import torch

from kv_transfer import pair_gloo
from kv_transfer.errors import KVTransferError
from kv_transfer.pages import (
    DEFAULT_MAX_CHUNK_BYTES,
    KVPageHeader,
    block_chunks,
    block_nbytes,
    check_layout,
    check_page,
    dtype_from_name,
    gather_pages,
    make_header,
    payload_view,
    write_pages_tensor,
)
from kv_transfer.state import KVTransfer, TransferState, TransferTable


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else pair_gloo.BACKEND


class CollectiveKVReceiver:
    """Decode side: joins groups on request and lands the pages each recv brings."""

    def __init__(
        self,
        kv_cache: torch.Tensor,
        table: TransferTable,
        on_ready: Callable[[KVTransfer], None],
        on_failed: Callable[[KVTransfer], None] | None = None,
    ) -> None:
        self.kv_cache, self.table = kv_cache, table
        self.on_ready, self.on_failed = on_ready, on_failed
        self._groups: set[str] = set()
        self.refused = 0  # Ray authenticates its callers: nothing to refuse here
        self.endpoint = ""  # set by kv_transfer.transport: the node and actor, for /status
        pair_gloo.register()

    def join(self, group_name: str, backend: str) -> None:
        col.init_collective_group(2, 1, backend=backend, group_name=group_name)  # type: ignore[arg-type]
        self._groups.add(group_name)

    def leave(self, group_name: str) -> None:
        if group_name in self._groups:
            self._groups.discard(group_name)
            col.destroy_collective_group(group_name)

    def leave_all(self) -> None:
        for group_name in list(self._groups):
            self.leave(group_name)

    def close(self) -> None:
        self.leave_all()

    def open_streams(self) -> int:
        return 0  # no call stays open: each layer is one Ray call from the sender

    def cancel(self, request_id: str) -> None:
        """Nothing to cancel: a page for a released reservation is consumed and refused."""

    def recv_layer(self, group_name: str, header: KVPageHeader) -> None:
        """Receive the tensor the sender is sending now, then check and land it."""
        dtype = dtype_from_name(header.dtype)
        pages = torch.empty(header.shape, dtype=dtype, device=self.kv_cache.device)
        col.recv(pages, 0, group_name)  # always consume the send, even for a page we refuse
        try:
            if pages.device.type == "cpu":
                check_page(self.kv_cache, header, payload_view(pages))
            else:  # NCCL delivers intact; a crc would cost a device-to-host copy
                check_layout(self.kv_cache, header)
            with self.table.landing(header):
                write_pages_tensor(self.kv_cache, header.layer, header.dst_block_ids, pages)
        except KVTransferError as error:
            self._fail(header.request_id, str(error))
            raise

    def done(self, request_id: str, first_token_id: int, num_prompt_tokens: int) -> str:
        """All pages sent: READY (on_ready called) or FAILED; returns the state's name."""
        transfer = self.table.on_done(request_id, first_token_id, num_prompt_tokens)
        state = transfer.state  # the owner may move it on (RUNNING) in _announce
        self._announce(transfer)
        return state.name

    def _fail(self, request_id: str, reason: str) -> None:
        failed = self.table.fail(request_id, reason)
        if failed is not None:
            self._announce(failed)

    def _announce(self, transfer: KVTransfer) -> None:
        if transfer.state is TransferState.READY:
            self.on_ready(transfer)
        elif self.on_failed is not None:
            self.on_failed(transfer)


@dataclass(slots=True)
class _Page:
    request_id: str
    layer: int
    dst_block_ids: tuple[int, ...]
    pages: torch.Tensor


@dataclass(slots=True)
class _Done:
    request_id: str
    first_token_id: int
    num_prompt_tokens: int
    acked: Future


_STOP = object()


class _PeerLink:
    """One decode worker: its group, and the thread that sends to it in order."""

    def __init__(
        self,
        sender_name: str,
        endpoint,
        backend: str | None,
        timeout_s: float,
        namespace: str | None = None,
    ):
        named = isinstance(endpoint, str)
        self.handle = ray.get_actor(endpoint, namespace=namespace) if named else endpoint
        peer = endpoint if isinstance(endpoint, str) else endpoint._actor_id.hex()[:12]
        self.base_name = f"kv/{sender_name}->{peer}"
        self.backend, self.timeout_s = backend, timeout_s
        self.group: str | None = None
        self.failed: dict[str, str] = {}  # request_id -> why its pages could not go
        self.outbound: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"{self.base_name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.outbound.get()) is not _STOP:
            if isinstance(item, _Done):
                self._finish(item)
            elif item.request_id not in self.failed:
                try:
                    self._send(item)
                except Exception as error:  # any failure fails the request, not the thread
                    self.failed[item.request_id] = f"{type(error).__name__}: {error}"
                    self._drop_group()
        self._drop_group()

    def _ensure_group(self, device: torch.device) -> str:
        if self.group is None:
            backend = self.backend or default_backend(device)
            group = f"{self.base_name}/{uuid.uuid4().hex[:8]}"
            joined = self.handle.kv_join.remote(group, backend)
            col.init_collective_group(2, 0, backend=backend, group_name=group)  # type: ignore[arg-type]
            ray.get(joined, timeout=self.timeout_s)
            self.group = group
        return self.group

    def _send(self, item: _Page) -> None:
        group = self._ensure_group(item.pages.device)
        on_cpu = item.pages.device.type == "cpu"
        payload = payload_view(item.pages) if on_cpu else b""
        header = make_header(item.request_id, item.layer, item.dst_block_ids, item.pages, payload)
        landed = self.handle.kv_recv_layer.remote(group, header)
        col.send(item.pages, 1, group)
        ray.get(landed, timeout=self.timeout_s)

    def _finish(self, item: _Done) -> None:
        why = self.failed.pop(item.request_id, None)
        if why is None:
            try:
                ref = self.handle.kv_done.remote(
                    item.request_id, item.first_token_id, item.num_prompt_tokens
                )
                state = ray.get(ref, timeout=self.timeout_s)
                why = None if state == TransferState.READY.name else f"decode side is {state}"
            except Exception as error:
                why = f"{type(error).__name__}: {error}"
        if why is None:
            item.acked.set_result(None)
        else:
            item.acked.set_exception(KVTransferError(f"{item.request_id}: {why}"))

    def _drop_group(self) -> None:
        group, self.group = self.group, None
        if group is None:
            return
        self.handle.kv_leave.remote(group)  # fire and forget: the peer may be gone
        if col.is_group_initialized(group):
            col.destroy_collective_group(group)

    def close(self, timeout_s: float) -> None:
        self.outbound.put(_STOP)
        self.thread.join(timeout_s)


class CollectiveKVSender:
    """Prefill side, same interface as GrpcKVSender; endpoint = decode actor name or handle."""

    def __init__(
        self,
        name: str,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        backend: str | None = None,
        timeout_s: float = 60.0,
        namespace: str | None = None,
    ) -> None:
        pair_gloo.register()
        self.name, self.max_chunk_bytes = name, max_chunk_bytes
        self.namespace = namespace  # where named decode actors are looked up
        self.backend, self.timeout_s = backend, timeout_s
        self._lock = threading.Lock()
        self._peers: dict[object, _PeerLink] = {}
        self._requests: dict[str, _PeerLink] = {}

    def begin(self, request_id: str, endpoint, tag: str = "") -> None:
        """The tag is not needed here: pages and done travel on Ray's authenticated calls."""
        with self._lock:
            if endpoint not in self._peers:
                self._peers[endpoint] = _PeerLink(
                    self.name, endpoint, self.backend, self.timeout_s, self.namespace
                )
            self._requests[request_id] = self._peers[endpoint]

    def _peer(self, request_id: str) -> _PeerLink:
        with self._lock:
            peer = self._requests.get(request_id)
        if peer is None:
            raise KVTransferError(f"{request_id}: no transfer begun")
        return peer

    def send_layer(
        self,
        request_id: str,
        kv_cache: torch.Tensor,
        layer: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
    ) -> None:
        """Copy layer `layer`'s pages out now; the peer's thread sends them in order."""
        peer = self._peer(request_id)
        if request_id in peer.failed:
            raise KVTransferError(f"{request_id}: {peer.failed[request_id]}")
        if len(src_block_ids) != len(dst_block_ids):
            raise KVTransferError(f"{request_id}: {len(src_block_ids)} src vs {len(dst_block_ids)}")
        for run in block_chunks(len(src_block_ids), block_nbytes(kv_cache), self.max_chunk_bytes):
            pages = gather_pages(kv_cache, layer, [src_block_ids[i] for i in run])
            dst = tuple(int(dst_block_ids[i]) for i in run)
            peer.outbound.put(_Page(request_id, layer, dst, pages))

    def finish(
        self, request_id: str, first_token_id: int, num_prompt_tokens: int, timeout_s: float = 30
    ) -> None:
        """After the request's pages, tell the decode worker; KVTransferError unless READY."""
        peer = self._peer(request_id)
        acked: Future = Future()
        peer.outbound.put(_Done(request_id, first_token_id, num_prompt_tokens, acked))
        try:
            acked.result(timeout=timeout_s)
        except TimeoutError:
            raise KVTransferError(f"{request_id}: no ack in {timeout_s}s") from None
        finally:
            with self._lock:
                self._requests.pop(request_id, None)

    def open_streams(self) -> int:
        with self._lock:
            return len(self._requests)

    def abort(self, request_id: str) -> None:
        """Stop sending a request's pages (the decode worker's lease reclaims its blocks)."""
        with self._lock:
            peer = self._requests.pop(request_id, None)
        if peer is not None:
            peer.failed[request_id] = "aborted"

    def close(self) -> None:
        with self._lock:
            peers, self._peers, self._requests = list(self._peers.values()), {}, {}
        for peer in peers:
            peer.close(self.timeout_s)
