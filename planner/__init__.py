"""The SLO autoscaler's decisions, in plain Python (no Ray, no asyncio): configuration,
load prediction, worker capacity, and the per-pool policy. router/autoscaler.py observes and
carries decisions out; the simulator runs the same code on a virtual clock."""

from planner.capacity import Capacity, DecodeProfile, PrefillProfile
from planner.config import AutoscaleConfig, PoolLimits
from planner.policy import Decision, Observation, Planner, PoolState

__all__ = [
    "AutoscaleConfig",
    "Capacity",
    "Decision",
    "DecodeProfile",
    "Observation",
    "Planner",
    "PoolLimits",
    "PoolState",
    "PrefillProfile",
]
