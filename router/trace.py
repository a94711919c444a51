"""One request's timeline across hops: marks (wall-clock seconds) from the router and from
the workers it touched, and the hops between them.

    router: arrival -> routed -> [disaggregated] prefill_sent -> prefill_returned
                                 [colocated]     submitted
            -> first_token (written to the client) -> finished
    prefill worker P (p_*): received, scheduled, first_token, kv_first_sent, kv_done
    decode worker D (d_*):  arrival (the reservation), landed (every page in), scheduled
    colocated worker W (w_*): received, scheduled, first_token

Hops up to the first token follow each other with no gap, so they sum to the router's TTFT:

    disaggregated: router_queue | reservation (KV room on D, picking P) | prefill_queue |
                   prefill_compute | kv_tail (pages after the last layer, D's ack) |
                   return (P's answer to the router) | deliver (to the client)
    colocated:     router_queue | worker_queue | prefill_compute | deliver

and after it: kv_transfer (first page sent -> every page landed on D), decode_queue
(landed -> admitted to a decode step), decode (first token -> last). Workers on other nodes
mark with their own clocks: hops that cross nodes carry the clocks' skew (NTP: ~ms).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

_DISAGG_TTFT = (
    ("router_queue", "arrival", "routed"),
    ("reservation", "routed", "prefill_sent"),
    ("prefill_queue", "prefill_sent", "p_scheduled"),
    ("prefill_compute", "p_scheduled", "p_first_token"),
    ("kv_tail", "p_first_token", "p_kv_done"),
    ("return", "p_kv_done", "prefill_returned"),
    ("deliver", "prefill_returned", "first_token"),
)
_COLOCATED_TTFT = (
    ("router_queue", "arrival", "routed"),
    ("worker_queue", "routed", "w_scheduled"),
    ("prefill_compute", "w_scheduled", "w_first_token"),
    ("deliver", "w_first_token", "first_token"),
)
_AFTER = (
    ("kv_transfer", "p_kv_first_sent", "d_landed"),
    ("decode_queue", "d_landed", "d_scheduled"),
    ("decode", "first_token", "finished"),
)


@dataclass(slots=True)
class Trace:
    request_id: str
    mode: str = "disaggregated"  # | "colocated"
    engine: str = ""  # the decode (or colocated) worker that serves it
    prefill: str = ""  # the prefill worker (disaggregated)
    attempts: int = 1  # more than one: it moved off a lost worker
    kv_bytes: int = 0
    kv_pages: int = 0
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, t: float) -> None:
        self.marks[name] = t

    def merge(self, prefix: str, marks: dict[str, float] | None) -> None:
        """A worker's marks (engine.outputs.RequestTimings.wall_marks) under its prefix."""
        for name, t in (marks or {}).items():
            self.marks[f"{prefix}_{name}"] = t

    def _span(self, start: str, end: str) -> float | None:
        a, b = self.marks.get(start), self.marks.get(end)
        return None if a is None or b is None else max(0.0, b - a)

    def ttft_hops(self) -> dict[str, float]:
        """The hops up to the first token, in order (only those both ends were marked)."""
        table = _COLOCATED_TTFT if self.mode == "colocated" else _DISAGG_TTFT
        return {h: s for h, a, b in table if (s := self._span(a, b)) is not None}

    def spans(self) -> dict[str, float]:
        """Every hop that could be measured: the TTFT path, then those after it."""
        after = {h: s for h, a, b in _AFTER if (s := self._span(a, b)) is not None}
        return {**self.ttft_hops(), **after}

    @property
    def ttft_s(self) -> float | None:
        return self._span("arrival", "first_token")

    def phases(self) -> dict[str, float]:
        """vLLM's request phases: queue (arrival -> scheduled on a worker), prefill
        (scheduled -> first token on it), decode (first token -> last), inference
        (scheduled -> last)."""
        w = "w" if self.mode == "colocated" else "p"
        spans = {
            "queue": self._span("arrival", f"{w}_scheduled"),
            "prefill": self._span(f"{w}_scheduled", f"{w}_first_token"),
            "decode": self._span("first_token", "finished"),
            "inference": self._span(f"{w}_scheduled", "finished"),
        }
        return {k: v for k, v in spans.items() if v is not None}

    def to_json(self) -> dict[str, Any]:
        t0 = self.marks.get("arrival", min(self.marks.values(), default=0.0))
        return {
            "request_id": self.request_id,
            "mode": self.mode,
            "engine": self.engine,
            "prefill": self.prefill,
            "attempts": self.attempts,
            "kv_bytes": self.kv_bytes,
            "kv_pages": self.kv_pages,
            "ttft_s": self.ttft_s,
            "hops_s": self.spans(),
            "ttft_hops": list(self.ttft_hops()),
            "marks_s": {k: round(v - t0, 6) for k, v in sorted(self.marks.items(), key=_by_t)},
            "arrival_unix_s": t0,
        }


def hop_bounds(trace: Trace) -> dict[str, tuple[float, float]]:
    """(start, end) wall-clock seconds of every hop `trace.spans()` measures."""
    table = _COLOCATED_TTFT if trace.mode == "colocated" else _DISAGG_TTFT
    marks = trace.marks
    return {
        hop: (marks[a], max(marks[a], marks[b]))
        for hop, a, b in (*table, *_AFTER)
        if a in marks and b in marks
    }


def _by_t(item: tuple[str, float]) -> float:
    return item[1]


class TraceStore:
    """The last `capacity` finished requests' traces, by request id (GET /debug/trace/ID)."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._traces: OrderedDict[str, Trace] = OrderedDict()

    def put(self, trace: Trace) -> None:
        self._traces[trace.request_id] = trace
        self._traces.move_to_end(trace.request_id)
        while len(self._traces) > self.capacity:
            self._traces.popitem(last=False)

    def get(self, request_id: str) -> Trace | None:
        return self._traces.get(request_id)

    def __len__(self) -> int:
        return len(self._traces)
