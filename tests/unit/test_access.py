"""router.access from plain values: where the API key comes from, how a presented one is
checked, the drain gate's count; and `splitserve serve`'s checks of its access flags."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from engine.errors import SplitServeError
from router.access import API_KEY_ENV, Gate, KeyCheck, resolve_api_key
from router.serve import _client_access, _is_loopback, add_serve_args


def test_key_from_flag_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert resolve_api_key(None) is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(None) == "from-env"
    assert resolve_api_key("from-flag") == "from-flag"  # the flag wins
    monkeypatch.setenv(API_KEY_ENV, "  ")
    assert resolve_api_key(None) is None  # an empty variable: no key
    with pytest.raises(SplitServeError, match="--api-key is empty"):
        resolve_api_key("")  # an empty flag is a mistake, not "no key"


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        ("Bearer sk-1", True),
        ("bearer sk-1", True),
        ("Bearer   sk-1 ", True),
        ("Bearer sk-2", False),
        ("Bearer sk-", False),
        ("Bearer sk-11", False),
        ("Basic sk-1", False),
        ("sk-1", False),
        ("Bearer", False),
        ("", False),
        (None, False),
    ],
)
def test_key_check(header: str | None, accepted: bool) -> None:
    assert KeyCheck("sk-1").accepts(header) is accepted


def test_gate_counts_admitted_until_drained() -> None:
    async def scenario() -> None:
        gate = Gate()
        assert await gate.drained(0)  # nothing in flight
        assert gate.enter() and gate.enter() and gate.in_flight == 2
        gate.close()
        assert not gate.enter() and gate.in_flight == 2  # refused, not counted
        assert not await gate.drained(0.01)  # the grace runs out with two in flight
        waiter = asyncio.create_task(gate.drained(5))
        gate.leave()
        await asyncio.sleep(0)
        assert not waiter.done()
        gate.leave()
        assert await asyncio.wait_for(waiter, 1) and gate.in_flight == 0

    asyncio.run(scenario())


def test_stop_waiting_cuts_the_drain_short() -> None:
    async def scenario() -> None:
        gate = Gate()
        assert gate.enter()
        gate.close()
        waiter = asyncio.create_task(gate.drained(30))
        await asyncio.sleep(0)
        gate.stop_waiting()
        assert not await asyncio.wait_for(waiter, 1)  # released, one still in flight

    asyncio.run(scenario())


def _serve_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return p.parse_args(list(argv))


def test_serve_defaults_bind_loopback_with_a_grace() -> None:
    args = _serve_args()
    assert args.host == "127.0.0.1" and args.api_key is None and args.shutdown_grace == 30.0
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("10.0.0.5")
    assert not _is_loopback("example.com")


def test_serve_warns_when_exposed_without_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert _client_access(_serve_args()) == (None, None)
    assert capsys.readouterr().err == ""
    assert _client_access(_serve_args("--host", "0.0.0.0")) == (None, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("splitserve: warning: --host 0.0.0.0 exposes")
    monkeypatch.setenv(API_KEY_ENV, "sk-1")
    assert _client_access(_serve_args("--host", "0.0.0.0")) == ("sk-1", None)
    assert capsys.readouterr().err == ""
    with pytest.raises(SplitServeError, match="--shutdown-grace"):
        _client_access(_serve_args("--shutdown-grace", "-1"))
