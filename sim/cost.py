"""What a simulated step and a simulated request's hops cost.

A step is described by four numbers, whatever the scheduler put in it
(engine.scheduler.SchedulerOutput.features):
    prefill_tokens  prompt tokens computed this step
    prefill_ctx     sum over those tokens of the context each attends to (its position + 1)
    decode_seqs     sequences computing one token each
    decode_ctx      sum of those sequences' lengths (the KV their attention reads)

Two models answer `step_s`:
  - `FittedCost`: linear in the four, plus a fixed cost and one more for a step holding any
    prompt tokens, the decoding sequences counted beyond a knee (`fit_knee` picks it),
    fitted by least squares to steps of the real engine measured on this machine
    (bench/sim_fit.py times them or reads the serving workers' step logs; `fit`).
  - `RooflineCost`: a GPU target from published figures (sim.hardware): the larger of compute
    and HBM traffic at assumed MFU / MBU, plus tensor-parallel all-reduce and a fixed cost.

`Hops` are the costs outside the engine's steps: the router's handling, a call to a worker,
delivering a token to the client, the KV transfer's tail, a new worker's start-up.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from engine.errors import InvalidRequestError
from sim import hardware
from sim.noise import StepNoise

TERMS = ("fixed", "prefill_step", "prefill_tokens", "prefill_ctx", "decode_seqs", "decode_ctx")
KNEES = (0, 2, 4, 6, 8, 12, 16)  # the decode knees `fit_knee` tries


class CostModel(Protocol):
    num_blocks: int  # KV blocks one worker holds
    block_size: int

    def step_s(
        self, prefill_tokens: int, prefill_ctx: float, decode_seqs: int, decode_ctx: int
    ) -> float: ...

    def host_factor(self, stepping: int, prefilling: int = 0) -> float: ...


@dataclass(frozen=True, slots=True)
class Hops:
    router_s: float = 0.002  # arrival at the router to routed (HTTP, tokenize, admission)
    # the same while other requests are in flight (a busy worker answers the router's calls
    # later; bench.sim_calibrate); None: router_s either way
    router_busy_s: float | None = None
    rpc_s: float = 0.001  # one call from the router to a worker and its answer
    deliver_s: float = 0.001  # a token from the worker's step to the client
    kv_fixed_s: float = 0.001  # after the last layer: done + ack between P and D
    kv_bytes_per_s: float = 25e9  # P to D link
    kv_bytes_per_token: int = 0  # 0: KV transfer costs only kv_fixed_s
    worker_start_s: float = 30.0  # a new worker: placed, model loaded, profiled, active

    def routing_s(self, busy: bool) -> float:
        """Arrival to routed, with or without other requests in flight."""
        return self.router_busy_s if busy and self.router_busy_s is not None else self.router_s

    def kv_tail_s(self, prompt_tokens: int, layers: int = 1) -> float:
        """KV pages stream layer by layer during prefill: what is left after the last layer
        is that layer's pages and the done/ack; more when the link is slower than compute
        (then `kv_transfer_s` bounds it from below)."""
        return self.kv_fixed_s + self.kv_transfer_s(prompt_tokens) / max(1, layers)

    def kv_transfer_s(self, prompt_tokens: int) -> float:
        if self.kv_bytes_per_token <= 0:
            return 0.0
        return prompt_tokens * self.kv_bytes_per_token / self.kv_bytes_per_s


@dataclass(slots=True)
class FittedCost:
    coef: dict[str, float]
    num_blocks: int
    block_size: int = 16
    layers: int = 1
    hops: Hops = field(default_factory=Hops)
    # Workers sharing one host (the CPU machine here): a step runs `host_share` x slower
    # while another worker of the host steps too, and k/host_slots x slower again when k
    # workers step at once on host_slots cores' worth of threads.
    host_share: float = 1.0
    host_slots: int = 2
    source: str = ""  # what was measured, where, when
    # A decode step costs no more for its first `decode_knee` sequences than for one (on
    # this CPU reading the weights bounds a small batch, not its arithmetic: the engine
    # stepped 1 and 4 sequences in 23 and 22 ms, 16 in 39, 64 in 114): `decode_seqs`
    # counts the sequences beyond it. 0: linear from the first.
    decode_knee: int = 0
    # The slowdown while the other worker's step holds prompt tokens (None: host_share).
    # Here a decode step lost ~16% to the other worker's decode step (both stream the
    # weights) and ~5% to a colocated worker's prefill (two colocated calibrations, 2026-12-07).
    host_share_prefill: float | None = None
    # How the real steps scatter about this model, and how long a slow stretch lasts
    # (sim.noise; bench.sim_steps.fit_noise). None: every step takes the model's time.
    noise: StepNoise | None = None

    def __post_init__(self) -> None:
        unknown = set(self.coef) - set(TERMS)
        if unknown:
            raise InvalidRequestError(f"unknown cost terms {sorted(unknown)}; known: {TERMS}")
        self.coef = {t: float(self.coef.get(t, 0.0)) for t in TERMS}

    def host_factor(self, stepping: int, prefilling: int = 0) -> float:
        """How much slower a step runs while `stepping` workers of its host step (itself
        included), `prefilling` of the others on steps that hold prompt tokens."""
        if stepping <= 1:
            return 1.0
        others = stepping - 1
        share = (
            (others - prefilling) * self.host_share + prefilling * self.share_beside_prefill
        ) / others
        return share * max(1.0, stepping / self.host_slots)

    @property
    def share_beside_prefill(self) -> float:
        return self.host_share if self.host_share_prefill is None else self.host_share_prefill

    def step_s(
        self, prefill_tokens: int, prefill_ctx: float, decode_seqs: int, decode_ctx: int
    ) -> float:
        c = self.coef
        return (
            c["fixed"]
            + (c["prefill_step"] if prefill_tokens else 0.0)
            + c["prefill_tokens"] * prefill_tokens
            + c["prefill_ctx"] * prefill_ctx
            + c["decode_seqs"] * max(0, decode_seqs - self.decode_knee)
            + c["decode_ctx"] * decode_ctx
        )

    def to_json(self) -> dict[str, Any]:
        return {"kind": "fitted", "coef": self.coef, "num_blocks": self.num_blocks,
                "block_size": self.block_size, "layers": self.layers,
                "hops": asdict(self.hops), "host_share": self.host_share,
                "host_slots": self.host_slots, "source": self.source,
                "decode_knee": self.decode_knee,
                "host_share_prefill": self.host_share_prefill,
                "noise": None if self.noise is None else self.noise.to_json()}  # fmt: skip

    @staticmethod
    def load(path: Path) -> FittedCost:
        try:
            data = json.loads(Path(path).read_text())
            known = {f.name for f in fields(Hops)}
            hops = Hops(**{k: v for k, v in data.get("hops", {}).items() if k in known})
            coef = {t: float(data["coef"].get(t, 0.0)) for t in TERMS}
            if not data["coef"]:
                raise ValueError("no coefficients")
            on_prefill = data.get("host_share_prefill")
            return FittedCost(coef, int(data["num_blocks"]), int(data.get("block_size", 16)),
                              int(data.get("layers", 1)), hops,
                              float(data.get("host_share", 1.0)), int(data.get("host_slots", 2)),
                              data.get("source", ""), int(data.get("decode_knee", 0)),
                              None if on_prefill is None else float(on_prefill),
                              StepNoise.from_json(data.get("noise")))  # fmt: skip
        except OSError as exc:
            raise InvalidRequestError(f"cannot read cost model {path}: {exc.strerror}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidRequestError(f"bad cost model {path}: {exc!r}") from None


def features(prefill_tokens: int, prefill_ctx: float, decode_seqs: int, decode_ctx: int,
             knee: int = 0):  # fmt: skip
    return (1.0, float(prefill_tokens > 0), float(prefill_tokens), float(prefill_ctx),
            float(max(0, decode_seqs - knee)), float(decode_ctx))  # fmt: skip


def fit_knee(rows: list[tuple[tuple, float]]) -> tuple[dict[str, float], int]:
    """`fit` at each of KNEES (rows: a step's four features and its seconds); the
    coefficients and knee with the least squared relative error."""
    best: tuple[float, dict[str, float], int] | None = None
    for knee in KNEES:
        coef = fit([(features(f[0], f[1], f[2], f[3], knee), dt) for f, dt in rows])
        cost = FittedCost(coef, 1, decode_knee=knee)
        err = sum((cost.step_s(f[0], f[1], f[2], f[3]) / dt - 1) ** 2 for f, dt in rows)
        if best is None or err < best[0]:
            best = (err, coef, knee)
    assert best is not None, "no rows to fit"
    return best[1], best[2]


def fit(rows: list[tuple[tuple[float, ...], float]]) -> dict[str, float]:
    """Least squares of step seconds on the terms, in relative error (each row divided by
    its time: a 40 ms decode step counts as much as a 1.5 s prefill), no coefficient below
    zero (a term that would come out negative is dropped and the rest refitted)."""
    active = list(range(len(TERMS)))
    while True:
        xs = [[x[i] / y for i in active] for x, y in rows]
        sol = _lstsq(xs, [1.0] * len(rows))
        if all(v >= 0 for v in sol) or len(active) == 1:
            coef = dict.fromkeys(TERMS, 0.0)
            for i, v in zip(active, sol, strict=True):
                coef[TERMS[i]] = max(v, 0.0)
            return coef
        active.pop(min(range(len(sol)), key=lambda j: sol[j]))


def _lstsq(xs: list[list[float]], ys: list[float]) -> list[float]:
    """Normal equations, columns scaled to unit norm, Gaussian elimination with pivoting."""
    n = len(xs[0])
    scale = [math.sqrt(sum(x[i] ** 2 for x in xs)) or 1.0 for i in range(n)]
    a = [[sum(x[i] * x[j] for x in xs) / (scale[i] * scale[j]) for j in range(n)]
         for i in range(n)]  # fmt: skip
    b = [sum(x[i] * y for x, y in zip(xs, ys, strict=True)) / scale[i] for i in range(n)]
    for i in range(n):
        a[i][i] += 1e-12
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[piv], b[col], b[piv] = a[piv], a[col], b[piv], b[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            a[r] = [u - f * v for u, v in zip(a[r], a[col], strict=True)]
            b[r] -= f * b[col]
    sol = [0.0] * n
    for i in reversed(range(n)):
        sol[i] = (b[i] - sum(a[i][j] * sol[j] for j in range(i + 1, n))) / a[i][i]
    return [s / scale[i] for i, s in enumerate(sol)]


@dataclass(slots=True)
class RooflineCost:
    """A TP group of `tp` GPUs running `model` in bf16 (sim.hardware's figures and
    assumptions); KV capacity: vLLM's default 90% of HBM after the weights."""

    gpu: hardware.GPU
    model: hardware.Model
    tp: int = 1
    block_size: int = 16
    mem_fraction: float = 0.9
    num_blocks: int = 0
    hops: Hops = field(default_factory=Hops)
    _flops_s: float = field(init=False, default=0.0)
    _bytes_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        tokens = hardware.kv_capacity_tokens(self.gpu, self.model, self.tp, self.mem_fraction)
        self.num_blocks = tokens // self.block_size
        if self.num_blocks < 1:
            raise InvalidRequestError(
                f"{self.model.name} does not fit on {self.tp} x {self.gpu.name} "
                f"({self.model.weight_bytes / 1e9:.0f} GB of weights); use more GPUs per worker"
            )
        self.hops = Hops(
            kv_bytes_per_token=self.model.kv_bytes_per_token,
            kv_bytes_per_s=self.tp * self.gpu.network_gbs * 1e9,
            worker_start_s=60.0,  # assumption: weights from local NVMe, CUDA graphs captured
        )
        self._flops_s = self.tp * self.gpu.dense_bf16_tflops * 1e12 * hardware.MFU
        self._bytes_s = self.tp * self.gpu.hbm_bandwidth_gbs * 1e9 * hardware.MBU

    @property
    def layers(self) -> int:
        return self.model.layers

    def host_factor(self, stepping: int, prefilling: int = 0) -> float:
        return 1.0  # a GPU worker has its GPUs to itself

    def step_s(
        self, prefill_tokens: int, prefill_ctx: float, decode_seqs: int, decode_ctx: int
    ) -> float:
        m, tokens = self.model, prefill_tokens + decode_seqs
        flops = tokens * m.flops_per_token + m.attention_flops(prefill_ctx + decode_ctx)
        hbm = m.weight_bytes + (decode_ctx + tokens) * m.kv_bytes_per_token
        return (
            max(flops / self._flops_s, hbm / self._bytes_s)
            + hardware.allreduce_s(self.gpu, m, self.tp, tokens)
            + hardware.STEP_OVERHEAD_S
        )
