"""Proof that a KV push belongs to a live reservation.

    the fleet: one random secret per cluster ──(TransportConfig, through Ray)──> every worker
    decode reserve(id): nonce = random; tag = HMAC-SHA256(secret, decode | id | nonce)
        ──> Ticket.tag ──(router)──> prefill: the Push call's metadata carries the tag
    KV server: tag == the reservation's tag (constant time)? land pages : refuse, count

A forged push (no secret) cannot make a tag; a replayed one names a reservation that is
gone, or whose nonce (so tag) is new. Nothing on this path is unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

TAG_METADATA = "x-splitserve-kv-tag"  # gRPC metadata key of a Push call's tag


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def ticket_tag(secret: bytes, decode_worker: str, request_id: str, nonce: bytes) -> str:
    message = b"kv-push|" + decode_worker.encode() + b"|" + request_id.encode() + b"|" + nonce
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def tags_match(expected: str, presented: str) -> bool:
    """Constant-time check. A reservation made without a tag (the transports' own tests;
    a decode worker always makes one) takes any push."""
    return not expected or hmac.compare_digest(expected.encode(), presented.encode())
