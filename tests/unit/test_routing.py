"""The routing policy and node placement from plain values (no Ray, no asyncio)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from engine.block_manager import chain_hash
from engine.errors import InvalidRequestError
from router.placement import (
    DECODE_RESOURCE,
    PREFILL_RESOURCE,
    PlacementPolicy,
    Role,
    plan_placement,
)
from router.routing import (
    DecodeLoad,
    PrefillLoad,
    PrefillPolicy,
    PrefixIndex,
    block_hashes,
    decode_order,
    pick_prefill,
)


def test_decode_order_prefers_free_kv_and_penalises_streams_in_flight():
    rng = random.Random(0)
    loads = [DecodeLoad("a", 100, 0), DecodeLoad("b", 500, 0), DecodeLoad("c", 300, 0)]
    assert decode_order(loads, rng) == ["b", "c", "a"]
    # b has more room but 60 streams in flight that will grow: c goes first
    loads = [DecodeLoad("b", 500, 60), DecodeLoad("c", 300, 0)]
    assert decode_order(loads, rng) == ["c", "b"]


def test_decode_order_breaks_ties_at_random():
    rng = random.Random(1)
    loads = [DecodeLoad(n, 100, 0) for n in "abcd"]
    firsts = Counter(decode_order(loads, rng)[0] for _ in range(400))
    assert set(firsts) == set("abcd") and min(firsts.values()) > 50


def test_prefix_policy_sends_a_prompt_where_its_prefix_is_cached():
    rng = random.Random(0)
    workers = [PrefillLoad("p0", 0, 0), PrefillLoad("p1", 100, 992)]
    # p1 has 100 tokens queued but 992 of this 1,000-token prompt cached: 108 < 1000
    assert pick_prefill(workers, 1000, PrefillPolicy.PREFIX, rng) == "p1"


def test_prefix_policy_spills_a_hot_prefix_once_its_worker_is_busier_than_it_is_worth():
    rng = random.Random(0)
    workers = [PrefillLoad("p0", 0, 0), PrefillLoad("p1", 5000, 992)]
    assert pick_prefill(workers, 1000, PrefillPolicy.PREFIX, rng) == "p0"
    # and without any cache it is least queued tokens
    workers = [PrefillLoad("p0", 300, 0), PrefillLoad("p1", 200, 0)]
    assert pick_prefill(workers, 50, PrefillPolicy.PREFIX, rng) == "p1"


def test_least_loaded_picks_the_less_queued_of_two_and_random_spreads():
    rng = random.Random(3)
    two = [PrefillLoad("p0", 10, 0), PrefillLoad("p1", 900, 1000)]
    assert {pick_prefill(two, 1000, PrefillPolicy.LEAST_LOADED, rng) for _ in range(50)} == {"p0"}
    picks = Counter(pick_prefill(two, 1000, PrefillPolicy.RANDOM, rng) for _ in range(400))
    assert min(picks.values()) > 150
    with pytest.raises(ValueError):
        pick_prefill([], 10, PrefillPolicy.PREFIX, rng)


def test_block_hashes_chain_full_blocks_like_the_engine_prefix_cache():
    ids = list(range(10))
    hashes = block_hashes(ids, 4)
    assert len(hashes) == 2  # the partial third block is never cached
    assert hashes[0] == chain_hash(None, ids[0:4])
    assert hashes[1] == chain_hash(hashes[0], ids[4:8])
    # the same block after another prefix is another hash
    assert block_hashes([9, 9, 9, 9, *ids[4:8]], 4)[1] != hashes[1]


def test_prefix_index_counts_leading_blocks_and_forgets_least_recent_first():
    index = PrefixIndex()
    index.add_worker("p0", capacity_blocks=4)
    a, b = block_hashes(list(range(16)), 4), block_hashes(list(range(100, 116)), 4)
    index.record("p0", a)
    assert index.cached_blocks("p0", a) == 4
    assert index.cached_blocks("p0", [a[0], 12345, a[2]]) == 1  # leading run only
    index.record("p0", b[:2])  # capacity 4: a's two oldest blocks go
    assert index.cached_blocks("p0", a) == 0
    assert index.cached_blocks("p0", b) == 2
    assert index.cached_blocks("unknown", a) == 0
    index.remove_worker("p0")
    assert index.workers() == set() and index.cached_blocks("p0", b) == 0


NODES = [
    {"CPU": 1.0},
    {"CPU": 1.0, PREFILL_RESOURCE: 1000.0},
    {"CPU": 1.0, DECODE_RESOURCE: 1000.0},
]
ROLES = (Role.PREFILL, Role.DECODE)


def test_auto_placement_asks_for_each_role_resource_that_a_node_offers():
    p = plan_placement(PlacementPolicy.AUTO, NODES, ROLES, 0.5, 0.0)
    assert p.options(Role.PREFILL)["resources"] == {PREFILL_RESOURCE: 0.01}
    assert p.options(Role.DECODE)["resources"] == {DECODE_RESOURCE: 0.01}
    assert p.options(Role.DECODE)["num_cpus"] == 0.5
    unmarked = plan_placement(PlacementPolicy.AUTO, NODES[:2], ROLES, 0.5, 1.0)
    assert "resources" not in unmarked.options(Role.DECODE)  # no decode node: anywhere
    assert unmarked.options(Role.DECODE)["num_gpus"] == 1.0


def test_roles_placement_refuses_a_role_that_no_node_has_and_any_ignores_marks():
    with pytest.raises(InvalidRequestError, match="decode role's resource"):
        plan_placement(PlacementPolicy.ROLES, NODES[:2], ROLES, 0.5, 0.0)
    anywhere = plan_placement(PlacementPolicy.ANY, NODES, ROLES, 0.5, 0.0)
    assert "resources" not in anywhere.options(Role.PREFILL)
    colocated = plan_placement(PlacementPolicy.ROLES, NODES, (Role.COLOCATED,), 0.5, 0.0)
    assert "resources" not in colocated.options(Role.COLOCATED)
