"""A ray.util.collective backend ("KV_GLOO"): one standalone gloo process group per group.

Why not ray's own "GLOO" backend (ray 2.60: TorchGLOOGroup, torch.distributed gloo
underneath, no pygloo needed)? It initialises the process-wide *default*
torch.distributed group with the first group a process joins, and its send/recv
call dist.send/dist.recv on that default group. A decode worker paired with two
prefill workers would therefore send to, or wait on, the wrong peer, and a group
left and re-joined keeps the old peer. KV transfer needs many 2-rank groups per
process (one per prefill/decode pair) that come and go, so each group here owns
its own TCPStore and ProcessGroupGloo:

    rank 0 (prefill)                                rank 1 (decode)
    TCPStore(master, port 0) -> internal_kv[key]    poll internal_kv[key] (bounded)
    ProcessGroupGloo(store, 0, 2) <── connect ───>  TCPStore(client) -> ProcessGroupGloo(1)
    delete internal_kv[key]
    send/recv: pg.send([t], peer, tag).wait()       destroy: drop pg and store

The rendezvous poll is setup-only (as in ray's backend); transfers never poll.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import ray
import torch.distributed as dist
from ray.experimental import internal_kv
from ray.util.collective.backend_registry import _global_registry, register_collective_backend
from ray.util.collective.collective_group.torch_gloo_collective_group import TorchGLOOGroup
from ray.util.collective.types import RecvOptions, SendOptions

BACKEND = "KV_GLOO"
RENDEZVOUS_TIMEOUT_S = 60.0


def _key(group_name: str) -> str:
    return f"splitserve_kv_gloo:{group_name}"


class PairGlooGroup(TorchGLOOGroup):
    """A gloo group of its own (not torch.distributed's default group); send/recv/barrier."""

    def __init__(self, world_size: int, rank: int, group_name: str) -> None:
        # Skip TorchGLOOGroup.__init__ (it binds the default process group).
        self._world_size, self._rank, self._group_name = world_size, rank, group_name
        timeout = timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
        host = ray.util.get_node_ip_address()
        if rank == 0:
            self._store = dist.TCPStore(host, 0, world_size, True, timeout, wait_for_workers=False)
            internal_kv._internal_kv_put(_key(group_name), f"{host}:{self._store.port}")
        else:
            master, port = _wait_for_master(group_name)
            self._store = dist.TCPStore(master, port, world_size, False, timeout)
        self._gloo: Any = dist.ProcessGroupGloo(self._store, rank, world_size, timeout)
        self._is_default_group, self._pg = False, None  # TorchGLOOGroup fields we do not use
        if rank == 0:  # every rank has connected once the constructor returns
            internal_kv._internal_kv_del(_key(group_name))

    @classmethod
    def backend(cls) -> str:
        return BACKEND

    @classmethod
    def check_backend_availability(cls) -> bool:
        return dist.is_available() and dist.is_gloo_available()

    def _live(self) -> Any:  # ProcessGroupGloo; torch's stubs omit its send/recv
        if self._gloo is None:
            raise RuntimeError(f"KV group {self._group_name} was destroyed")
        return self._gloo

    def send(self, tensor, send_options: SendOptions) -> None:
        self._live().send([self._check_tensor_input(tensor)], send_options.dst_rank, 0).wait()

    def recv(self, tensor, recv_options: RecvOptions) -> None:
        self._live().recv([self._check_tensor_input(tensor)], recv_options.src_rank, 0).wait()

    def barrier(self, barrier_options=None) -> None:
        self._live().barrier().wait()

    def destroy_group(self) -> None:
        self._gloo = None  # drops the gloo pairs and, with the store, the rendezvous socket
        del self._store


def _wait_for_master(group_name: str) -> tuple[str, int]:
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while time.monotonic() < deadline:
        address = internal_kv._internal_kv_get(_key(group_name))
        if address is not None:
            host, port = address.decode().rsplit(":", 1)
            return host, int(port)
        time.sleep(0.01)  # setup-only rendezvous: rank 0 publishes within milliseconds
    raise TimeoutError(f"no rank 0 for KV group {group_name} in {RENDEZVOUS_TIMEOUT_S}s")


def register() -> None:
    """Make "KV_GLOO" known to ray.util.collective in this process (idempotent)."""
    if not _global_registry.is_registered(BACKEND):
        register_collective_backend(BACKEND, PairGlooGroup)
