"""The KV transports behind two typed protocols, built from one frozen config.

    TransportConfig(kind, kv_host, namespace)           (the fleet builds it once)
    prefill worker: make_sender(config, name) -> KVSender
                    sender.begin(id, peer_of(config, ticket)); send_layer...; finish
    decode worker:  make_receiver(config, kv, table, on_ready, on_failed) -> KVReceiver
                    receiver.endpoint goes into every Ticket it hands out

gRPC: the decode worker's KV server listens on `kv_host` (default: its node's own
address, so prefill workers on other nodes reach it) and advertises host:port.
Collective: pages go over ray.util.collective (NCCL on GPUs, gloo on CPU); the
peer is the decode worker's named actor, looked up in the fleet's namespace.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.errors import InvalidRequestError
from kv_transfer.state import KVTransfer, TransferTable
from kv_transfer.ticket import Ticket
from kv_transfer.tls import KVTLS

ACTOR_NAMESPACE = "splitserve"  # where the fleet creates named worker actors


class TransportKind(enum.Enum):
    GRPC = "grpc"
    COLLECTIVE = "collective"


@dataclass(frozen=True, slots=True)
class TransportConfig:
    kind: TransportKind = TransportKind.GRPC
    kv_host: str = ""  # KV server bind address; "" = the node's own IP; "0.0.0.0" = all
    kv_port: int = 0  # 0 = any free port
    namespace: str = ACTOR_NAMESPACE
    secret: bytes = b""  # the cluster's KV-push secret (kv_transfer.auth); "" = per worker
    tls: KVTLS | None = None  # gRPC KV over TLS (kv_transfer.tls)

    @classmethod
    def parse(
        cls,
        kind: str,
        kv_host: str = "",
        namespace: str = ACTOR_NAMESPACE,
        secret: bytes = b"",
        tls: KVTLS | None = None,
    ) -> TransportConfig:
        try:
            transport = TransportKind(kind)
        except ValueError:
            names = ", ".join(k.value for k in TransportKind)
            raise InvalidRequestError(f"unknown kv transport {kind!r}; choose {names}") from None
        return cls(transport, kv_host, namespace=namespace, secret=secret, tls=tls)


class KVSender(Protocol):
    def begin(self, request_id: str, peer: Any, tag: str = "") -> None: ...

    def send_layer(
        self,
        request_id: str,
        kv_cache: torch.Tensor,
        layer: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
    ) -> None: ...

    def finish(self, request_id: str, first_token_id: int, num_prompt_tokens: int) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def open_streams(self) -> int: ...

    def close(self) -> None: ...


class KVReceiver(Protocol):
    endpoint: str
    refused: int  # pushes refused for want of a valid reservation tag

    def open_streams(self) -> int: ...

    def cancel(self, request_id: str) -> None: ...

    def close(self) -> None: ...


def node_address() -> str:
    """This process's node address inside Ray; loopback outside it (tests, one machine)."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def make_sender(config: TransportConfig, name: str) -> KVSender:
    if config.kind is TransportKind.COLLECTIVE:
        from kv_transfer.collective_transport import CollectiveKVSender

        return CollectiveKVSender(name, namespace=config.namespace)
    from kv_transfer.grpc_transport import GrpcKVSender

    return GrpcKVSender(tls=config.tls)


def peer_of(config: TransportConfig, ticket: Ticket) -> Any:
    """gRPC: the decode worker's KV server address; collective: its actor's name."""
    if config.kind is TransportKind.COLLECTIVE:
        return ticket.decode_worker
    return ticket.endpoint


def make_receiver(
    config: TransportConfig,
    kv_cache: torch.Tensor,
    table: TransferTable,
    on_ready: Callable[[KVTransfer], None],
    on_failed: Callable[[KVTransfer], None],
    name: str = "",
) -> KVReceiver:
    node = node_address()
    if config.kind is TransportKind.COLLECTIVE:
        from kv_transfer.collective_transport import CollectiveKVReceiver

        receiver = CollectiveKVReceiver(kv_cache, table, on_ready, on_failed)
        receiver.endpoint = f"ray://{node}/{name}"
        return receiver
    from kv_transfer.grpc_transport import GrpcKVServer

    bind = config.kv_host or node
    server = GrpcKVServer(
        kv_cache, table, on_ready, bind, config.kv_port, on_failed=on_failed, tls=config.tls
    )
    server.start()
    if bind in ("0.0.0.0", "::", "[::]"):  # listening everywhere: advertise the node's address
        server.endpoint = f"{node}:{server.port}"
    return server
