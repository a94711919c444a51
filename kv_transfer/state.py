"""Inbound KV of one request on the decode worker: a pure state machine (no torch, no I/O).

    reserve()                 on_page()            on_done(): every layer
  ──────────> RESERVED ──────────────> TRANSFERRING ───────────────────> READY
                 │   on_page() (more pages) ↺ │      covers every dst block   │ start_running()
                 │                            │                               ▼
                 │ fail() / lease             │ fail() / lease / on_done()   RUNNING
                 │ expires                    │ with a layer missing          │
                 ▼                            ▼                               │ free()
              FAILED | EXPIRED  <─────────────┘     READY ── fail() ──> FAILED │
                 │                                  READY ── free() ──────────┤
                 └──────────────────── free() ────────────────────────────────┴──> FREED

Every path ends in FREED, and only free() reaches it, once. The owner (the decode
worker) reacts to what these methods return — READY: hand the request to the
scheduler (kv_landed); FAILED/EXPIRED: give the blocks back and call free() — so
this module never calls out. Illegal transitions raise IllegalTransitionError.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from kv_transfer.errors import IllegalTransitionError, KVTransferError, UnknownTransferError


class TransferState(enum.Enum):
    RESERVED = "reserved"
    TRANSFERRING = "transferring"
    READY = "ready"
    RUNNING = "running"
    FREED = "freed"
    FAILED = "failed"
    EXPIRED = "expired"


S = TransferState
_NEXT: dict[TransferState, frozenset[TransferState]] = {
    S.RESERVED: frozenset({S.TRANSFERRING, S.FAILED, S.EXPIRED}),
    S.TRANSFERRING: frozenset({S.READY, S.FAILED, S.EXPIRED}),
    S.READY: frozenset({S.RUNNING, S.FAILED, S.FREED}),
    S.RUNNING: frozenset({S.FREED}),
    S.FAILED: frozenset({S.FREED}),
    S.EXPIRED: frozenset({S.FREED}),
    S.FREED: frozenset(),
}
_RECEIVING = frozenset({S.RESERVED, S.TRANSFERRING})


class PageLike(Protocol):
    """What the state machine reads of a KVPageHeader."""

    @property
    def request_id(self) -> str: ...
    @property
    def layer(self) -> int: ...
    @property
    def dst_block_ids(self) -> tuple[int, ...]: ...


class KVTransfer:
    """One request's inbound KV: which blocks it owns and which pages have landed."""

    def __init__(
        self,
        request_id: str,
        dst_block_ids: Sequence[int],
        num_layers: int,
        lease_deadline_s: float,
        tag: str = "",
    ) -> None:
        if num_layers <= 0 or not dst_block_ids:
            raise ValueError("a transfer needs at least one layer and one block")
        self.request_id = request_id
        self.dst_block_ids = tuple(dst_block_ids)
        self.num_layers = num_layers
        self.lease_deadline_s = lease_deadline_s
        self.tag = tag  # what a push must present (kv_transfer.auth); "" = not checked
        self.state = S.RESERVED
        self.first_token_id: int | None = None
        self.num_prompt_tokens: int | None = None
        self.failure_reason: str | None = None
        self.pages_received = 0
        self.writers = 0  # pages being written into the blocks right now (TransferTable.landing)
        self._reserved = frozenset(self.dst_block_ids)
        self._landed: list[set[int]] = [set() for _ in range(num_layers)]

    def __repr__(self) -> str:
        return f"KVTransfer({self.request_id!r}, {self.state.name}, blocks={len(self._reserved)})"

    def _move(self, new: TransferState) -> None:
        if new not in _NEXT[self.state]:
            raise IllegalTransitionError(
                f"{self.request_id}: transfer cannot go {self.state.name} -> {new.name}"
            )
        self.state = new

    def on_page(self, header: PageLike) -> None:
        """Record landed pages; reject pages outside the reservation or after the transfer."""
        if self.state not in _RECEIVING:
            raise IllegalTransitionError(f"{self.request_id}: page while {self.state.name}")
        if header.request_id != self.request_id:
            raise KVTransferError(f"page for {header.request_id} sent to {self.request_id}")
        if not 0 <= header.layer < self.num_layers:
            raise KVTransferError(f"{self.request_id}: layer {header.layer} out of range")
        stray = set(header.dst_block_ids) - self._reserved
        if stray:
            raise KVTransferError(f"{self.request_id}: blocks {sorted(stray)} not reserved")
        if self.state is S.RESERVED:
            self._move(S.TRANSFERRING)
        self._landed[header.layer].update(header.dst_block_ids)
        self.pages_received += 1

    def missing_layers(self) -> list[int]:
        return [i for i, got in enumerate(self._landed) if got != self._reserved]

    def on_done(self, first_token_id: int, num_prompt_tokens: int) -> TransferState:
        """The sender is finished: READY if every layer covers every block, else FAILED."""
        if self.state not in _RECEIVING:
            raise IllegalTransitionError(f"{self.request_id}: done while {self.state.name}")
        missing = self.missing_layers()
        if missing:
            self.fail(f"done with layers {missing[:4]}{'...' if len(missing) > 4 else ''} missing")
            return self.state
        self.first_token_id = first_token_id
        self.num_prompt_tokens = num_prompt_tokens
        self._move(S.READY)
        return self.state

    def start_running(self) -> None:
        self._move(S.RUNNING)

    def fail(self, reason: str) -> None:
        self._move(S.FAILED)
        self.failure_reason = reason

    def free(self) -> None:
        self._move(S.FREED)

    def expire_if_due(self, now: float) -> bool:
        """RESERVED/TRANSFERRING past the lease -> EXPIRED; True if it just expired."""
        if self.state in _RECEIVING and now >= self.lease_deadline_s:
            self._move(S.EXPIRED)
            self.failure_reason = "lease expired"
            return True
        return False


class TransferTable:
    """Thread-safe registry of inbound transfers, owned by the decode worker.

    Transports call landing/on_done/fail from their threads; the worker's loop
    calls expire(now) and, once it has given a transfer's blocks back, free() (or
    release() to end a transfer from any state, e.g. on abort). Freeing waits for
    pages being written into the transfer's blocks, so a freed block is never
    written again by this transfer.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._no_writers = threading.Condition(self._lock)
        self._transfers: dict[str, KVTransfer] = {}
        self._block_owner: dict[int, str] = {}

    def reserve(
        self,
        request_id: str,
        dst_block_ids: Sequence[int],
        num_layers: int,
        lease_s: float,
        now: float | None = None,
        tag: str = "",
    ) -> KVTransfer:
        start = time.monotonic() if now is None else now
        with self._lock:
            if request_id in self._transfers:
                raise KVTransferError(f"{request_id}: already reserved")
            clash = sorted(b for b in dst_block_ids if b in self._block_owner)
            if clash:
                raise KVTransferError(f"{request_id}: blocks {clash} already reserved")
            transfer = KVTransfer(request_id, dst_block_ids, num_layers, start + lease_s, tag)
            self._transfers[request_id] = transfer
            self._block_owner.update(dict.fromkeys(transfer.dst_block_ids, request_id))
            return transfer

    def _forget(self, request_id: str) -> KVTransfer | None:
        transfer = self._transfers.pop(request_id, None)
        if transfer is not None:
            for block in transfer.dst_block_ids:
                del self._block_owner[block]
        return transfer

    def owned_blocks(self) -> set[int]:
        """Blocks some live transfer owns (for leak checks)."""
        with self._lock:
            return set(self._block_owner)

    def get(self, request_id: str) -> KVTransfer | None:
        with self._lock:
            return self._transfers.get(request_id)

    def _require(self, request_id: str) -> KVTransfer:
        transfer = self._transfers.get(request_id)
        if transfer is None:
            raise UnknownTransferError(f"{request_id}: no reservation (never made, or freed)")
        return transfer

    def on_page(self, header: PageLike) -> KVTransfer:
        """Record a page as landed (use landing() when the caller writes it into the cache)."""
        with self._lock:
            transfer = self._require(header.request_id)
            transfer.on_page(header)
            return transfer

    @contextmanager
    def landing(self, header: PageLike) -> Iterator[KVTransfer]:
        """Check and record a page, then hold off free() while the caller writes it."""
        with self._lock:
            transfer = self._require(header.request_id)
            transfer.on_page(header)
            transfer.writers += 1
        try:
            yield transfer
        finally:
            with self._lock:
                transfer.writers -= 1
                self._no_writers.notify_all()

    def on_done(self, request_id: str, first_token_id: int, num_prompt_tokens: int) -> KVTransfer:
        """Returns the transfer, READY or FAILED (the caller acts on which)."""
        with self._lock:
            transfer = self._require(request_id)
            transfer.on_done(first_token_id, num_prompt_tokens)
            return transfer

    def fail(self, request_id: str, reason: str) -> KVTransfer | None:
        """Fail a transfer that can still fail; returns it if this call failed it."""
        with self._lock:
            transfer = self._transfers.get(request_id)
            if transfer is None or S.FAILED not in _NEXT[transfer.state]:
                return None
            transfer.fail(reason)
            return transfer

    def renew(
        self, request_ids: Iterable[str], lease_s: float, now: float | None = None
    ) -> list[str]:
        """The owner is alive: push the leases of these receiving transfers out to now + lease_s.
        Returns the ids that have no live reservation any more (freed, failed or expired)."""
        deadline = (time.monotonic() if now is None else now) + lease_s
        gone = []
        with self._lock:
            for request_id in request_ids:
                transfer = self._transfers.get(request_id)
                if transfer is None or transfer.state not in _RECEIVING:
                    gone.append(request_id)
                else:
                    transfer.lease_deadline_s = max(transfer.lease_deadline_s, deadline)
        return gone

    def expire(self, now: float | None = None) -> list[KVTransfer]:
        """Expire every receiving transfer past its lease; returns the newly expired."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [t for t in self._transfers.values() if t.expire_if_due(now)]

    def free(self, request_id: str) -> KVTransfer:
        """READY/RUNNING/FAILED/EXPIRED -> FREED, and forgotten."""
        with self._lock:
            transfer = self._require(request_id)
            self._no_writers.wait_for(lambda: transfer.writers == 0)
            transfer.free()
            self._forget(request_id)
            return transfer

    def release(self, request_id: str, reason: str = "aborted") -> KVTransfer | None:
        """End a transfer from any live state (abort): fail it if it was still
        receiving, then FREED and forgotten. None if there was no such transfer."""
        with self._lock:
            transfer = self._transfers.get(request_id)
            if transfer is None:
                return None
            if transfer.state in _RECEIVING:
                transfer.fail(reason)
            self._no_writers.wait_for(lambda: transfer.writers == 0)
            transfer.free()
            self._forget(request_id)
            return transfer

    def pop(self, request_id: str) -> KVTransfer | None:
        """Forget a transfer in any state once no page is being written into it;
        the caller must then take it to FREED (prefer free() or release())."""
        with self._lock:
            transfer = self._transfers.get(request_id)
            if transfer is not None:
                self._no_writers.wait_for(lambda: transfer.writers == 0)
            return self._forget(request_id)

    def in_states(self, states: Iterable[TransferState]) -> list[KVTransfer]:
        wanted = set(states)
        with self._lock:
            return [t for t in self._transfers.values() if t.state in wanted]

    def __len__(self) -> int:
        with self._lock:
            return len(self._transfers)
