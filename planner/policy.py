"""One decision per interval, prefill and decode independently.

For each pool, in order:
  1. a previous decision is still being carried out  -> no change (never scale mid-change)
  2. the pool changed less than `cooldown_s` ago      -> no change
  3. its SLO is broken at the percentile (prefill: TTFT, decode: TPOT)
                                                      -> grow (at least by one)
  4. the predicted load needs more workers             -> grow to what it needs
  5. the predicted load needs fewer, the SLO holds with room (under scale_down_below x
     target, or too few requests to judge), and N-1 workers could have taken the busiest
     interval of the last two latency windows without breaching (predicted from its load,
     live from its busy workers; prefill: the TTFT of N-1 queues of prompts, M/D/1)
                                                      -> shrink by one
  6. otherwise                                        -> no change
A change is capped at `max_step` workers and kept within the pool's min and max.

Needs: prefill = predicted prompt tokens/s over one worker's corrected capacity (at
`headroom`); decode = the predicted sequences decoding at once (Little: rate x output
tokens x TPOT target) over the batch one worker may run within the TPOT target (at
`headroom`), and never fewer than KV use asks for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from planner.capacity import NO_COUNT, Capacity, ceil_div
from planner.config import AutoscaleConfig, PoolLimits
from planner.predict import Load, Predictor

KV_HIGH = 0.9  # a pool whose KV would pass this after losing a worker keeps it
WAIT_SHARE = 0.5  # TTFT broken mostly by waiting for decode room: the decode pool's fault


@dataclass(frozen=True, slots=True)
class PoolState:
    active: int
    busy: float = 0.0  # mean fraction of the interval the workers spent stepping
    running: float = 0.0  # mean sequences running per worker
    kv_use: float = 0.0  # mean KV use, 0..1


@dataclass(frozen=True, slots=True)
class Observation:
    now_s: float
    load: Load  # over the last interval
    ttft_s: float | None  # at the configured percentile over the window (None: too few)
    tpot_s: float | None
    prefill: PoolState
    decode: PoolState
    scaling: bool = False  # a previous decision is still being carried out
    reservation_s: float | None = None  # waiting for KV room on decode, at the percentile


@dataclass(frozen=True, slots=True)
class Decision:
    now_s: float
    prefill: int
    decode: int
    reasons: dict[str, str]
    changed: bool
    needed: dict[str, int] = field(default_factory=dict)  # before caps and hysteresis
    before: dict[str, int] = field(default_factory=dict)  # the active workers it saw


@dataclass(slots=True)
class Planner:
    config: AutoscaleConfig
    capacity: Capacity
    predictor: Predictor = field(init=False)
    last_change_s: dict[str, float] = field(default_factory=dict)
    recent: list[Observation] = field(default_factory=list)  # the last `lookback` intervals
    # (two latency windows: the busiest interval in them must fit on N-1 workers to shrink)
    lookback: int = field(init=False)

    def __post_init__(self) -> None:
        self.predictor = Predictor(self.config.predictor, self.config.ewma_alpha)
        self.lookback = max(3, math.ceil(2 * self.config.window_s / self.config.interval_s))

    def decide(self, obs: Observation) -> Decision:
        cfg, cap = self.config, self.capacity
        self.predictor.observe(obs.load)
        load = self.predictor.predict_with(obs.load)
        self.recent.append(obs)
        del self.recent[: -self.lookback]
        cap.correct_prefill(
            obs.load.rate * obs.load.prompt_tokens, obs.prefill.active, obs.prefill.busy
        )
        cap.correct_decode(obs.tpot_s, obs.decode.running)
        need_p = self._prefill_need(load)
        need_d = self._decode_need(load, obs.decode)
        # a TTFT broken by waiting for KV room on decode workers is the decode pool's
        waits = _waiting_for_decode(obs, cfg.ttft_target_s)
        ttft = None if waits else obs.ttft_s
        p, why_p = self._pool("prefill", obs, obs.prefill, need_p, ttft, cfg.ttft_target_s,
                              cfg.prefill, self._prefill_can_shrink(load))  # fmt: skip
        shrink_d = self._decode_can_shrink(load)
        d, why_d = self._pool("decode", obs, obs.decode, need_d, obs.tpot_s, cfg.tpot_target_s,
                              cfg.decode, shrink_d, waits)  # fmt: skip
        changed = p != obs.prefill.active or d != obs.decode.active
        for pool, new, old in (
            ("prefill", p, obs.prefill.active),
            ("decode", d, obs.decode.active),
        ):
            if new != old:
                self.last_change_s[pool] = obs.now_s
        return Decision(obs.now_s, p, d, {"prefill": why_p, "decode": why_d}, changed,
                        {"prefill": need_p, "decode": need_d},
                        {"prefill": obs.prefill.active, "decode": obs.decode.active})  # fmt: skip

    # ---- needs --------------------------------------------------------------------------
    def _prefill_need(self, load: Load) -> int:
        per_worker = self.capacity.prefill_tokens_per_s() * self.config.headroom
        return ceil_div(load.rate * load.prompt_tokens, per_worker)

    def _decode_slots(self) -> float:
        return self.capacity.decode_batch(self.config.tpot_target_s) * self.config.headroom

    def _decode_need(self, load: Load, pool: PoolState) -> int:
        decoding = load.rate * load.output_tokens * self.config.tpot_target_s
        by_kv = ceil_div(pool.active * pool.kv_use, KV_HIGH) if pool.kv_use > KV_HIGH else 0
        return max(ceil_div(decoding, self._decode_slots()), by_kv)

    # ---- the N -> N-1 check ---------------------------------------------------------------
    # A pool shrinks only if N-1 workers could have carried the busiest interval of the last
    # `lookback` (the latency window): one quiet interval, a Poisson dip, is not a trend.
    def _peak(self, load: Load) -> Load:
        loads = [o.load for o in self.recent] + [load]
        return Load(max(x.rate for x in loads), max(x.prompt_tokens for x in loads),
                    max(x.output_tokens for x in loads))  # fmt: skip

    def _prefill_can_shrink(self, load: Load) -> bool:
        n = self.recent[-1].prefill.active
        if n <= 1:
            return False
        peak = self._peak(load)
        per_worker = self.capacity.prefill_tokens_per_s()
        if per_worker <= 0:
            return False
        predicted = peak.rate * peak.prompt_tokens / ((n - 1) * per_worker)
        live = max(o.prefill.busy * o.prefill.active for o in self.recent) / (n - 1)
        rho = max(predicted, live)
        if rho > self.config.headroom or rho >= 1.0:
            return False
        # TTFT on N-1 workers, each a queue of prompts (M/D/1): one prompt's compute plus
        # twice the mean wait (about the p90 of the wait), against the target
        service = peak.prompt_tokens / per_worker
        wait = rho * service / (2 * (1 - rho))
        return service + 2 * wait <= self.config.ttft_target_s

    def _decode_can_shrink(self, load: Load) -> bool:
        n = self.recent[-1].decode.active
        if n <= 1:
            return False
        peak = self._peak(load)
        slots = self._decode_slots()
        decoding = peak.rate * peak.output_tokens * self.config.tpot_target_s
        predicted_ok = slots > 0 and decoding / (n - 1) <= slots
        running = max(o.decode.running * o.decode.active for o in self.recent)
        kv = max(o.decode.kv_use * o.decode.active for o in self.recent)
        return predicted_ok and running / (n - 1) <= slots and kv / (n - 1) <= KV_HIGH

    # ---- one pool ---------------------------------------------------------------------
    def _pool(
        self,
        name: str,
        obs: Observation,
        pool: PoolState,
        need: int,
        latency: float | None,
        target: float,
        limits: PoolLimits,
        can_shrink: bool,
        waits: bool = False,  # decode: requests wait for its KV room past the TTFT target
    ) -> tuple[int, str]:
        n, cfg = pool.active, self.config
        slo = "TTFT" if name == "prefill" else "TPOT"
        pct = f"p{cfg.percentile:g}"
        seen = "-" if latency is None else f"{1000 * latency:.0f} ms"
        if obs.scaling:
            return n, "a previous decision is still being carried out"
        since = obs.now_s - self.last_change_s.get(name, float("-inf"))
        if since < cfg.cooldown_s:
            return n, f"cooldown: changed {since:.0f} s ago"
        if waits:
            wait_ms = 1000 * (obs.reservation_s or 0.0)
            want, why = max(need, n + 1), f"TTFT broken by waiting for KV room ({wait_ms:.0f} ms)"
        elif latency is not None and latency > target:
            want, why = max(need, n + 1), f"{slo} {pct} {seen} > target {1000 * target:.0f} ms"
        elif need >= NO_COUNT:
            why = f"no worker count holds the {slo} target: one worker takes none of the load"
            want = need
        elif need > n:
            want, why = need, f"predicted load needs {need} workers"
        elif (
            need < n
            and can_shrink
            and latency is not None
            and latency < cfg.scale_down_below * target
        ):
            want, why = n - 1, f"{slo} {pct} {seen} and {n - 1} workers can take the load"
        else:
            return limits.clamp(n), f"holds ({slo} {pct} {seen}, load needs {need})"
        want = limits.clamp(max(n - cfg.max_step, min(n + cfg.max_step, want)))
        if want == n:
            return n, why + f"; at the pool's bound ({limits.min_workers}-{limits.max_workers})"
        return want, why


def _under(latency: float | None, bound: float) -> bool:
    """Under the bound, or too few requests to judge (then the load itself is small)."""
    return latency is None or latency < bound


def _waiting_for_decode(obs: Observation, ttft_target_s: float) -> bool:
    """TTFT broken, and mostly by waiting for KV room on the decode workers."""
    if obs.ttft_s is None or obs.ttft_s <= ttft_target_s or obs.reservation_s is None:
        return False
    return obs.reservation_s >= WAIT_SHARE * obs.ttft_s
