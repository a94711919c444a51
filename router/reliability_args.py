"""`splitserve serve` flags for faults, overload and the KV port: parsed into PoolConfig fields.

--max-migrations N          a request may move to new workers N times (then 503)
--max-queued-prompt-tokens  prefill admission bound, per prefill worker (then 429)
--max-waiting-per-decode    requests waiting for KV room, per decode worker (then 429)
--reserve-timeout S         how long a request waits for KV room (then 429)
--kv-tls-cert/-key/-ca      KV over gRPC with TLS (a cluster certificate)
"""

from __future__ import annotations

import argparse
from typing import Any

from engine.errors import SplitServeError


def add_reliability_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-migrations",
        type=int,
        default=3,
        help="times a request may move to new workers when one dies or its KV transfer fails",
    )
    p.add_argument(
        "--max-queued-prompt-tokens",
        type=int,
        default=None,
        help="prompt tokens queued per prefill worker before new requests get 429 "
        "(default: 4 x --max-num-batched-tokens, at least 8192: one longest prompt)",
    )
    p.add_argument(
        "--max-waiting-per-decode",
        type=int,
        default=16,
        help="requests waiting for KV room per decode worker before new ones get 429 "
        "(streams per decode worker are bounded by --max-num-seqs)",
    )
    p.add_argument(
        "--reserve-timeout",
        type=float,
        default=30.0,
        help="seconds a request waits for KV room on a decode worker before a 429",
    )
    p.add_argument(
        "--max-tpot-ms",
        type=float,
        default=None,
        help="a TPOT target: each decode worker hands out only as many lanes (reservations) "
        "as keep its decode step under it, so under overload admitted requests keep their "
        "TPOT and the rest wait or get 429 (default: lanes = --max-num-seqs)",
    )
    p.add_argument("--kv-tls-cert", default=None, help="PEM certificate of the KV servers")
    p.add_argument("--kv-tls-key", default=None, help="PEM key of --kv-tls-cert")
    p.add_argument(
        "--kv-tls-ca", default=None, help="CA prefill workers trust (default: the cert itself)"
    )
    p.add_argument(
        "--kv-tls-server-name",
        default="",
        help="name in the KV certificate, when it is not the KV servers' address",
    )


def reliability_config(args: argparse.Namespace) -> dict[str, Any]:
    """PoolConfig keyword arguments; a one-line SplitServeError for a bad value."""
    from kv_transfer.tls import KVTLS
    from router.admission import AdmissionLimits, default_queued_tokens

    if args.max_migrations < 0:
        raise SplitServeError(f"--max-migrations must be >= 0, got {args.max_migrations}")
    if args.reserve_timeout <= 0:
        raise SplitServeError(f"--reserve-timeout must be positive, got {args.reserve_timeout}")
    queued = args.max_queued_prompt_tokens or default_queued_tokens(
        args.max_num_batched_tokens, None
    )
    admission = AdmissionLimits(
        queued_tokens_per_prefill=queued,
        streams_per_decode=args.max_num_seqs,
        waiting_per_decode=args.max_waiting_per_decode,
    )
    tls = None
    if args.kv_tls_cert or args.kv_tls_key:
        if not (args.kv_tls_cert and args.kv_tls_key):
            raise SplitServeError("--kv-tls-cert and --kv-tls-key go together")
        tls = KVTLS.from_files(
            args.kv_tls_cert, args.kv_tls_key, args.kv_tls_ca or "", args.kv_tls_server_name
        )
    return {
        "max_migrations": args.max_migrations,
        "admission": admission,
        "reserve_timeout_s": args.reserve_timeout,
        "kv_tls": tls,
    }
