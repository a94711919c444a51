"""The load of `bench overload`: streaming OpenAI completions, each request's outcome classified.

    request ──HTTP 429──────────────> http_429     (Retry-After header and error body kept)
            ──HTTP 4xx / 5xx────────> http_4xx / http_5xx
            ──no connection, reset, timeout──> connection_error
            ──HTTP 200 ─ chunks ─ [DONE]──> ok   (TTFT / TPOT as `bench serve` measures them)
                         └ error event ──> overloaded_in_stream (code "overloaded") or
                                           error_in_stream (any other); the status was 200
                         └ ends without [DONE] ──> incomplete

Closed loop (`closed_loop`: N streams, each sends its next prompt when the last one ends)
measures capacity; open loop (`open_loop`: arrivals at fixed times, whatever the server
answers) offers a rate. One httpx.AsyncClient (serve_bench.OpenAIClient, no connection
limit) carries every request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from typing import Any

import httpx
import numpy as np

from bench import serve_bench, serve_metrics
from bench.serve_datasets import Sample

OUTCOMES = (
    "ok",
    "http_429",
    "overloaded_in_stream",
    "error_in_stream",
    "incomplete",
    "http_4xx",
    "http_5xx",
    "connection_error",
)


def _new_record(sample: Sample) -> dict[str, Any]:
    rec = serve_bench._new_record(sample)
    rec.update(outcome="", status=None, retry_after=None, error_type=None, error_code=None)
    return rec


def _error_fields(raw: str) -> tuple[str | None, str | None, str]:
    """(type, code, message) of an OpenAI error body; (None, None, raw) for anything else."""
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return None, None, raw.strip()[:300]
    if not isinstance(err, dict):
        return None, None, str(err)[:300]
    return err.get("type"), err.get("code"), str(err.get("message", ""))[:300]


class OverloadClient(serve_bench.OpenAIClient):
    """serve_bench's OpenAI client, keeping what a refused or failed request said."""

    async def send_classified(self, sample: Sample, rec: dict[str, Any]) -> None:
        url, body = self._body(sample)
        rec["start"] = time.perf_counter()
        try:
            async with self.http.stream("POST", url, json=body) as resp:
                rec["status"] = resp.status_code
                if resp.status_code == 200:
                    await self._read_stream(resp, rec)
                else:
                    await self._read_refusal(resp, rec)
        except httpx.TransportError as exc:  # refused, reset, timed out: the server dropped it
            rec["outcome"], rec["error"] = "connection_error", f"{type(exc).__name__}: {exc}"
        rec["end"] = time.perf_counter()
        rec["success"] = rec["outcome"] == "ok"
        if rec["token_times"]:
            rec["first_token_time"] = rec["token_times"][0]

    async def _read_refusal(self, resp: httpx.Response, rec: dict[str, Any]) -> None:
        raw = (await resp.aread()).decode(errors="replace")
        rec["retry_after"] = resp.headers.get("retry-after")
        rec["error_type"], rec["error_code"], message = _error_fields(raw)
        rec["error"] = f"HTTP {resp.status_code}: {message}"
        code = resp.status_code
        rec["outcome"] = "http_429" if code == 429 else "http_5xx" if code >= 500 else "http_4xx"

    async def _read_stream(self, resp: httpx.Response, rec: dict[str, Any]) -> None:
        rec["outcome"] = "incomplete"
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                if rec["outcome"] == "incomplete":
                    rec["outcome"] = "ok"
                return
            now = time.perf_counter()
            event = json.loads(data)
            if "error" in event:
                rec["error_type"], rec["error_code"], message = _error_fields(data)
                rec["error"] = f"in-stream error: {message}"
                overloaded = rec["error_code"] == "overloaded"
                rec["outcome"] = "overloaded_in_stream" if overloaded else "error_in_stream"
                continue  # [DONE] follows
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                rec["token_times"].append(now)
            if event.get("usage"):
                rec["output_tokens"] = event["usage"].get("completion_tokens", 0)
                rec["prompt_tokens"] = event["usage"].get("prompt_tokens", 0)


def _relative(records: list[dict[str, Any]], t0: float) -> None:
    for rec in records:
        for k in ("start", "end", "first_token_time"):
            if rec[k] is not None:
                rec[k] -= t0
        rec["token_times"] = [t - t0 for t in rec["token_times"]]


async def closed_loop(
    client: OverloadClient, samples: list[Sample], concurrency: int
) -> tuple[list[dict[str, Any]], float]:
    """`concurrency` streams working through `samples`; the records and the wall time."""
    records = [_new_record(s) for s in samples]
    queue = list(zip(samples, records, strict=True))[::-1]

    async def stream() -> None:
        while queue:
            sample, rec = queue.pop()
            await client.send_classified(sample, rec)

    t0 = time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(min(concurrency, len(samples)))))
    duration = time.perf_counter() - t0
    _relative(records, t0)
    return records, duration


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times (s from the start) of `n` requests at `rate` (gamma gaps; 1: Poisson)."""
    gaps = serve_bench.arrival_delays(n, rate, burstiness, seed)
    return np.cumsum(gaps).tolist()


async def open_loop(
    client: OverloadClient, samples: list[Sample], times: list[float]
) -> tuple[list[dict[str, Any]], float]:
    """Each sample sent at its time (no drift: sleeps to the absolute time), whatever came of
    the earlier ones; the records and the wall time until the last one ended."""
    records = [_new_record(s) for s in samples]
    t0 = time.perf_counter()
    tasks = []
    for sample, rec, at in zip(samples, records, times, strict=True):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(client.send_classified(sample, rec)))
    sent_s = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    _relative(records, t0)
    for rec in records:
        rec["sending_s"] = sent_s
    return records, duration


def phase_summary(records: list[dict[str, Any]], duration_s: float) -> dict[str, Any]:
    """Outcome counts, 429s' Retry-After and error bodies, and the admitted streams' latency."""
    counts = Counter(r["outcome"] for r in records)
    refused = [r for r in records if r["outcome"] == "http_429"]
    overloaded = [r for r in records if r["outcome"] in ("http_429", "overloaded_in_stream")]
    ok = [r for r in records if r["outcome"] == "ok"]
    s = serve_metrics.summarize(records, duration_s)
    sending_s = max((r.get("sending_s", 0.0) for r in records), default=0.0)
    return {
        "requests": len(records),
        "counts": {k: counts.get(k, 0) for k in OUTCOMES},
        "offered_rate": len(records) / sending_s if sending_s > 0 else None,
        "duration_s": duration_s,
        "completed_rate": len(ok) / duration_s,
        "output_throughput": s["output_throughput"],
        "retry_after_share": _share(refused, lambda r: r["retry_after"] is not None),
        "retry_after_values": sorted({r["retry_after"] for r in refused if r["retry_after"]}),
        "openai_error_body_share": _share(
            refused,
            lambda r: (r["error_type"], r["error_code"]) == ("rate_limit_error", "overloaded"),
        ),
        # how long a refused request took to learn it (429 or in-stream refusal)
        "refusal_ms": serve_metrics.stats_ms(serve_metrics.e2e(r) for r in overloaded),
        "all_tokens_share": _share(ok, lambda r: r["output_tokens"] == r["requested_output_len"]),
        "ttft_ms": s["ttft_ms"],
        "tpot_ms": s["tpot_ms"],
        "itl_ms": s["itl_ms"],
        "errors": _errors(records),
    }


def _errors(records: list[dict[str, Any]], n: int = 5) -> list[str]:
    """Up to `n` distinct errors, the rarest outcomes first (one connection error among a
    thousand 429s is the one to show)."""
    counts = Counter(r["outcome"] for r in records if r["error"])
    seen: dict[str, None] = {}
    for rec in sorted((r for r in records if r["error"]), key=lambda r: counts[r["outcome"]]):
        seen.setdefault(f"{rec['outcome']}: {rec['error']}")
    return list(seen)[:n]


def _share(records: list[dict[str, Any]], pred: Any) -> float | None:
    return sum(bool(pred(r)) for r in records) / len(records) if records else None


def client_args(base_url: str, args: argparse.Namespace) -> argparse.Namespace:
    """The `bench serve` options OpenAIClient reads, for the completions endpoint."""
    return serve_bench.default_args(
        base_url=base_url,
        model=args.served_model_name or args.model,
        ignore_eos=True,
        seed=args.seed,
        timeout=args.request_timeout,
        no_progress=True,
    )
