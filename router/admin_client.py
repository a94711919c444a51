"""`splitserve status` and `splitserve scale`: the client side of /status and /admin/scale
(and of /metrics, for `splitserve top`).

Python: `scale("http://127.0.0.1:8000", prefill=2, decode=2)` returns the new pool sizes;
a running server answers once new workers are active and removed ones have drained.
A server started with an API key wants it here too: `api_key=`, `--api-key` or
$SPLITSERVE_API_KEY (router.access.resolve_api_key).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from engine.errors import SplitServeError
from router.access import API_KEY_ENV, resolve_api_key


def _call(
    url: str,
    body: dict[str, Any] | None = None,
    timeout_s: float = 10.0,
    api_key: str | None = None,
) -> Any:
    data = None if body is None else json.dumps(body).encode()
    return json.loads(_fetch(url, data, timeout_s, api_key))


def _fetch(url: str, data: bytes | None, timeout_s: float, api_key: str | None) -> bytes:
    """The body of a GET (or a POST of `data`); SplitServeError in one line on failure."""
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:  # the server's OpenAI error body, in one line
        try:
            message = json.load(exc)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        if exc.code == 401:
            message += f" (give the server's key: --api-key or ${API_KEY_ENV})"
        raise SplitServeError(f"{url}: {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SplitServeError(f"cannot reach splitserve at {url}: {exc}") from None


def scale(
    url: str,
    prefill: int | None = None,
    decode: int | None = None,
    colocated: int | None = None,
    timeout_s: float = 900.0,
    api_key: str | None = None,
) -> dict[str, int]:
    """Resize a running server's pools; SplitServeError with the server's message if refused."""
    wanted = {"prefill": prefill, "decode": decode, "colocated": colocated}
    body = {k: v for k, v in wanted.items() if v is not None}
    if not body:
        raise SplitServeError("say which pool to scale: --prefill N, --decode M or --colocated K")
    for pool, n in body.items():
        if n < 0:
            raise SplitServeError(f"--{pool} must be 0 or more, got {n}")
    return _call(url.rstrip("/") + "/admin/scale", body, timeout_s, api_key)["pools"]


def status(url: str, api_key: str | None = None) -> dict[str, Any]:
    return _call(url.rstrip("/") + "/status", api_key=api_key)


def metrics_text(url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The server's GET /metrics, Prometheus text (open; the key is sent when given, for a
    proxy in front that may want it)."""
    return _fetch(url.rstrip("/") + "/metrics", None, timeout_s, api_key).decode()


def run_scale(args: argparse.Namespace) -> int:
    key = resolve_api_key(args.api_key)
    pools = scale(args.url, args.prefill, args.decode, args.colocated, args.timeout, key)
    print("pools now: " + ", ".join(f"{pool} {n}" for pool, n in pools.items()))
    return 0


def run_status(args: argparse.Namespace) -> int:
    report = status(args.url, resolve_api_key(args.api_key))
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    pools = ", ".join(f"{k} {v}" for k, v in report.get("pools", {}).items())
    print(
        f"model {report.get('model')}  mode {report.get('mode')}  "
        f"kv transport {report.get('kv_transport', '-')}  pools: {pools or '-'}"
    )
    print(
        f"{'worker':<12}{'role':<10}{'state':<10}{'node':<16}{'kv endpoint':<22}"
        f"{'in flight':>10}{'queued':>8}{'kv used/total':>15}{'prefix hit':>12}"
    )
    for w in report.get("workers", []):
        kv = f"{w.get('kv_blocks_used', '-')}/{w.get('kv_blocks_total', '-')}"
        queries = w.get("prefix_query_tokens", 0)
        hit = f"{w.get('prefix_hit_tokens', 0) / queries:.0%}" if queries else "-"
        print(
            f"{w['name']:<12}{w['role']:<10}{w.get('state', '-'):<10}{w.get('node', '-'):<16}"
            f"{w.get('endpoint') or '-':<22}{w.get('in_flight', w.get('running', 0)):>10}"
            f"{w.get('queued_tokens', w.get('waiting', 0)):>8}{kv:>15}{hit:>12}"
        )
    return 0
