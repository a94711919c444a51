"""`RayBackend`: what the front ends talk to, over the fleet of Ray workers.

PoolConfig ──> placement (router.placement) ──> Fleet.start: first pools, ACTIVE
generate(id, prompt, params) ──> RequestLife(router, ...).run()   (router.request_life)
scale(prefill=, decode=, colocated=) ──> Fleet.scale: grow (health-checked) / drain
status() ──> every worker: role, node, state, KV endpoint, load, KV use, prefix hits
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from engine.engine_config import EngineConfig
from engine.engine_loop import TokenDelta
from engine.errors import InvalidRequestError
from engine.loader import load_tokenizer, resolve_model
from engine.sampling_params import SamplingParams
from kv_transfer.auth import new_secret
from kv_transfer.tls import KVTLS
from kv_transfer.transport import ACTOR_NAMESPACE, TransportConfig
from router.admission import AdmissionLimits, default_queued_tokens
from router.fleet import Fleet, FleetConfig, Worker
from router.placement import PlacementPolicy, Role, plan_placement
from router.request_life import RequestLife, Router
from router.routing import PrefillPolicy, PrefixIndex


@dataclass(frozen=True, slots=True)
class PoolConfig:
    engine: EngineConfig
    num_prefill: int = 1
    num_decode: int = 1
    mode: str = "disaggregated"  # | "colocated"
    kv_transport: str = "grpc"  # | "collective"
    kv_host: str = ""  # KV server address; "" = each decode worker's node address
    namespace: str = ACTOR_NAMESPACE  # Ray namespace of the workers' named actors
    layerwise: bool = True
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    placement: str = "auto"  # | "roles" | "any" (router.placement)
    prefill_routing: str = "prefix"  # | "least-loaded" | "random" (router.routing)
    reserve_timeout_s: float = 30.0
    start_timeout_s: float = 300.0
    drain_timeout_s: float = 60.0
    max_migrations: int = 3  # a request may move to new workers this often
    admission: AdmissionLimits | None = None  # None: from the engine (streams = max_num_seqs)
    kv_tls: KVTLS | None = None  # KV over gRPC with TLS

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "colocated"):
            raise InvalidRequestError(f"unknown mode {self.mode!r}")
        if self.num_decode < 1 or (self.mode == "disaggregated" and self.num_prefill < 1):
            raise InvalidRequestError("each pool needs at least one worker")
        _ = (self.placement_policy, self.prefill_policy, self.transport)  # bad names raise here

    @property
    def placement_policy(self) -> PlacementPolicy:
        return _enum(PlacementPolicy, self.placement, "placement")

    @property
    def prefill_policy(self) -> PrefillPolicy:
        return _enum(PrefillPolicy, self.prefill_routing, "prefill routing")

    @property
    def transport(self) -> TransportConfig:
        return TransportConfig.parse(
            self.kv_transport, self.kv_host, self.namespace, tls=self.kv_tls
        )

    @property
    def admission_limits(self) -> AdmissionLimits:
        if self.admission is not None:
            return self.admission
        e = self.engine
        queued = default_queued_tokens(e.max_num_batched_tokens, e.max_model_len)
        return AdmissionLimits(queued_tokens_per_prefill=queued, streams_per_decode=e.max_num_seqs)

    @property
    def colocated(self) -> bool:
        return self.mode == "colocated"

    def first_counts(self) -> dict[Role, int]:
        if self.colocated:  # the same slots as disaggregated, each worker doing both phases
            return {Role.COLOCATED: self.num_prefill + self.num_decode}
        return {Role.PREFILL: self.num_prefill, Role.DECODE: self.num_decode}


def _enum(cls, value: str, what: str):
    try:
        return cls(value)
    except ValueError:
        names = ", ".join(m.value for m in cls)
        raise InvalidRequestError(f"unknown {what} {value!r}; choose {names}") from None


class RayBackend:
    def __init__(self, config: PoolConfig, model_name: str = "smollm2-135m") -> None:
        self.config, self.model_name = config, model_name
        self.autoscaler: Any = None  # router.autoscaler.Autoscaler, when on
        counts = config.first_counts()
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        placement = plan_placement(
            config.placement_policy,
            nodes,
            counts,
            config.cpus_per_worker,
            config.gpus_per_worker,
        )
        self.fleet = Fleet(
            FleetConfig(
                engine=config.engine,
                placement=placement,
                transport=dataclasses.replace(config.transport, secret=new_secret()),
                colocated=config.colocated,
                layerwise=config.layerwise,
                start_timeout_s=config.start_timeout_s,
                drain_timeout_s=config.drain_timeout_s,
            )
        )
        infos = self.fleet.start(counts)
        self.router = Router(
            self.fleet,
            PrefixIndex(),
            config.prefill_policy,
            config.reserve_timeout_s,
            admission=config.admission_limits,
            max_migrations=config.max_migrations,
        )
        self._sync_prefix_index()
        self.max_model_len = self.fleet.max_model_len  # the smallest of the workers' own
        self.vocab_size = infos[0]["vocab_size"]
        self.tokenizer = load_tokenizer(resolve_model(config.engine.model))

    # ---- Backend ------------------------------------------------------------------
    def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[TokenDelta]:
        return RequestLife(self.router, request_id, list(prompt_token_ids), params).run()

    async def scale(
        self, prefill: int | None = None, decode: int | None = None, colocated: int | None = None
    ) -> dict[str, int]:
        """Set pool sizes while serving; returns once new workers are active and removed
        ones have drained. Bad counts raise InvalidRequestError before anything changes."""
        wanted = {Role.PREFILL: prefill, Role.DECODE: decode, Role.COLOCATED: colocated}
        targets = {role: n for role, n in wanted.items() if n is not None}
        if not targets:
            raise InvalidRequestError("say which pool to scale (prefill, decode or colocated)")
        try:
            counts = await self.fleet.scale(targets)
        finally:
            self._sync_prefix_index()
        return {role.value: n for role, n in counts.items()}

    def _sync_prefix_index(self) -> None:
        index = self.router.prefix_index
        members = {w.name: w for w in self.fleet.members(Role.PREFILL)}
        for name in index.workers() - members.keys():
            index.remove_worker(name)
        for name, worker in members.items():
            if name not in index.workers() and worker.engine:
                index.add_worker(name, worker.engine["kv_blocks_total"])

    async def status(self) -> dict[str, Any]:
        await self.fleet.refresh()
        return {
            "model": self.model_name,
            "mode": self.config.mode,
            "kv_transport": self.config.kv_transport,
            "prefill_routing": self.router.policy.value,
            "pools": {role.value: n for role, n in self.fleet.counts().items()},
            "placement": {
                role.value: dict(res) for role, res in self.fleet.config.placement.resources.items()
            },
            "recovery": {
                **dataclasses.asdict(self.router.stats),
                "workers_replaced": self.fleet.replaced,
                "leases_held": self.router.leases.held(),
            },
            "workers": [_worker_status(w) for w in self.fleet.members()],
            "autoscaler": None if self.autoscaler is None else self.autoscaler.status(),
        }

    async def healthy(self) -> bool:
        await self.fleet.refresh()
        return self.fleet.healthy()

    def shutdown(self) -> None:
        self.router.leases.close()
        self.fleet.shutdown()


def _worker_status(w: Worker) -> dict[str, Any]:
    return {
        "name": w.name,
        "role": w.role.value,
        "state": w.state.value,
        "node": w.node,
        "endpoint": w.endpoint,
        "pid": w.pid,
        "in_flight": w.in_flight,
        "queued_tokens": w.queued_tokens,
        **w.engine,
    }
