"""Where workers go: a node is marked for a role with a Ray custom resource.

    ray start ... --resources '{"splitserve_prefill": 1000}'   # a prefill node
    ray start ... --resources '{"splitserve_decode": 1000}'    # a decode node

Each worker asks for ROLE_SHARE of its role's resource, so any positive amount
marks a node (1000 never limits the count). `auto` (default): a role's resource
is asked for when some node offers it, so an unmarked cluster places anywhere;
`roles`: every pool must have a marked node, else a one-line error at start;
`any`: ignore the marks. On GPU nodes each worker also takes one GPU.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

PREFILL_RESOURCE = "splitserve_prefill"
DECODE_RESOURCE = "splitserve_decode"
ROLE_SHARE = 0.01


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


ROLE_RESOURCE = {Role.PREFILL: PREFILL_RESOURCE, Role.DECODE: DECODE_RESOURCE}


class PlacementPolicy(enum.Enum):
    AUTO = "auto"
    ROLES = "roles"
    ANY = "any"


@dataclass(frozen=True, slots=True)
class Placement:
    """Ray actor options per role, decided once from the cluster's nodes."""

    resources: Mapping[Role, Mapping[str, float]] = field(default_factory=dict)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def options(self, role: Role) -> dict[str, object]:
        opts: dict[str, object] = {
            "num_cpus": self.cpus_per_worker,
            "num_gpus": self.gpus_per_worker,
        }
        if self.resources.get(role):
            opts["resources"] = dict(self.resources[role])
        return opts


def plan_placement(
    policy: PlacementPolicy,
    node_resources: Iterable[Mapping[str, float]],
    roles: Iterable[Role],
    cpus_per_worker: float,
    gpus_per_worker: float,
) -> Placement:
    """Pick each role's resource from what the alive nodes offer; error when `roles` cannot."""
    offered = {name for res in node_resources for name, amount in res.items() if amount > 0}
    resources: dict[Role, dict[str, float]] = {}
    for role in roles:
        name = ROLE_RESOURCE.get(role)
        if name is None or policy is PlacementPolicy.ANY:
            continue
        if name in offered:
            resources[role] = {name: ROLE_SHARE}
        elif policy is PlacementPolicy.ROLES:
            raise InvalidRequestError(
                f"no node of the cluster offers the {role.value} role's resource {name!r} "
                f"(start one with: ray start ... --resources '{{\"{name}\": 1000}}')"
            )
    return Placement(resources, cpus_per_worker, gpus_per_worker)
