"""Bounded admission (router.admission) and lease renewal (kv_transfer.state), from numbers."""

from __future__ import annotations

import pytest

from engine.errors import InvalidRequestError, OverloadedError
from kv_transfer.state import TransferState, TransferTable
from router.admission import AdmissionLimits, PoolLoad, check_decode, check_prefill

LIMITS = AdmissionLimits(queued_tokens_per_prefill=1000, streams_per_decode=4, waiting_per_decode=2)


def test_prefill_admits_up_to_its_queued_token_bound_per_worker():
    check_prefill(LIMITS, PoolLoad(workers=2, queued_tokens=1500), prompt_tokens=500)
    with pytest.raises(OverloadedError, match="prefill pool is full") as err:
        check_prefill(LIMITS, PoolLoad(workers=2, queued_tokens=1500), prompt_tokens=501)
    assert err.value.retry_after_s == LIMITS.retry_after_s


def test_a_long_prompt_gets_into_an_empty_prefill_queue():
    check_prefill(LIMITS, PoolLoad(workers=1, queued_tokens=0), prompt_tokens=5000)


def test_decode_bounds_waiting_and_held_requests_per_worker():
    check_decode(LIMITS, PoolLoad(workers=2, held=11, waiting=3))
    with pytest.raises(OverloadedError, match="decode pool is full"):
        check_decode(LIMITS, PoolLoad(workers=2, held=0, waiting=4))  # 2 waiting x 2 workers
    with pytest.raises(OverloadedError):
        check_decode(LIMITS, PoolLoad(workers=2, held=12, waiting=0))  # (4 + 2) x 2 held


@pytest.mark.parametrize("field", ["queued_tokens_per_prefill", "streams_per_decode"])
def test_limits_must_be_positive(field):
    with pytest.raises(InvalidRequestError, match=field):
        AdmissionLimits(**{field: 0})


def test_a_renewed_lease_outlives_its_first_deadline_and_an_unrenewed_one_expires():
    table = TransferTable()
    table.reserve("kept", [0, 1], num_layers=2, lease_s=10, now=0.0)
    table.reserve("left", [2, 3], num_layers=2, lease_s=10, now=0.0)
    assert table.renew(["kept", "gone"], lease_s=10, now=8.0) == ["gone"]
    expired = table.expire(now=12.0)
    assert [t.request_id for t in expired] == ["left"]
    assert table.get("kept").state is TransferState.RESERVED
    assert table.renew(["left"], lease_s=10, now=12.0) == ["left"]  # expired: not revived
    assert table.expire(now=18.1)[0].request_id == "kept"
