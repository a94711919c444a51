"""The reservation a decode worker hands out, carried by the router to a prefill worker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ticket:
    request_id: str
    decode_worker: str  # actor name, e.g. "decode-0"
    block_ids: tuple[int, ...]  # where the prompt's pages go in the decode worker's cache
    endpoint: str  # gRPC KV server "host:port" of the decode worker
    free_blocks: int  # the decode worker's free blocks after this reservation (routing hint)
    tag: str = ""  # proof of this reservation a KV push presents (kv_transfer.auth)
