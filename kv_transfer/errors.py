"""The one error type of KV transfer (no torch, no I/O: importable from the pure state machine)."""

from __future__ import annotations


class KVTransferError(Exception):
    """KV pages could not be moved: a bad checksum or layout, an unknown or expired
    reservation, pages for blocks outside the reservation, an illegal state
    transition, or a dead peer. The message names which."""


class IllegalTransitionError(KVTransferError):
    """A transfer was asked to move between two states its automaton does not connect."""


class ChecksumMismatchError(KVTransferError):
    """A payload's crc32 differs from its header's: the pages were corrupted on the way."""


class UnknownTransferError(KVTransferError):
    """No live reservation for the request: never made, already freed, or expired and reaped."""
