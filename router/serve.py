"""`splitserve serve`: start or join Ray, start the pools, serve HTTP and gRPC until stopped."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import sys
from typing import TYPE_CHECKING

from engine.engine_config import DTYPE_CHOICES, EngineConfig
from router.access import API_KEY_ENV, GRACE_S, resolve_api_key
from router.autoscale_args import add_autoscale_args, autoscale_config
from router.reliability_args import add_reliability_args, reliability_config

if TYPE_CHECKING:
    import grpc

DASHBOARD_PORT = 8265


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--mode", default="disaggregated", choices=["disaggregated", "colocated"])
    p.add_argument("--kv-transport", default="grpc", choices=["grpc", "collective"])
    p.add_argument(
        "--no-layerwise",
        action="store_true",
        help="send KV after the whole prefill instead of layer by layer",
    )
    p.add_argument(
        "--kv-host",
        default="",
        help="address decode workers' KV servers listen on (default: each one's node address)",
    )
    p.add_argument(
        "--placement",
        default="auto",
        choices=["auto", "roles", "any"],
        help="auto: use node role resources (splitserve_prefill / splitserve_decode) where "
        "nodes offer them; roles: require them; any: ignore them",
    )
    p.add_argument(
        "--prefill-routing",
        default="prefix",
        choices=["prefix", "least-loaded", "random"],
        help="how a prompt's prefill worker is picked (prefix: prefix-cache aware)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="Ray CPUs each worker asks for (default on CPU: half the cluster's CPUs shared by "
        "the first workers, at most 1, so the pools can double; 1 on GPUs)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=300.0,
        help="seconds a new worker may take to be placed, load its model and pass a health check",
    )
    p.add_argument(
        "--drain-timeout", type=float, default=60.0, help="seconds a removed worker may drain"
    )
    p.add_argument(
        "--namespace",
        default="splitserve",
        help="Ray namespace of the workers' named actors (one per server on a shared cluster)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the HTTP and gRPC APIs listen on (default: loopback only); any other, "
        "such as 0.0.0.0, exposes them to the network: set an API key",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (auto|HOST:PORT); default: start a local one",
    )
    p.add_argument(
        "--node-ip-address",
        default=None,
        help="this node's address in the cluster, when it has several (with --address)",
    )
    p.add_argument(
        "--dashboard-port",
        type=int,
        default=DASHBOARD_PORT,
        help="Ray dashboard port of the local cluster (not with --address)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="auto (default): bfloat16 where the CPU or GPU computes it natively (AMX, "
        "AVX512-BF16, a bf16 GPU), else float32",
    )
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache per worker")
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument(
        "--no-packed-gemm",
        action="store_true",
        help="CPU: skip the packed copy of the weights (saves their size in memory per "
        "worker; float32 decode steps of 5-64 sequences and every bfloat16 GEMM run slower)",
    )
    p.add_argument("--served-model-name", default=None)
    p.add_argument(
        "--otlp-endpoint",
        default=None,
        help="export each request's hop-by-hop trace as OpenTelemetry spans to this OTLP/HTTP "
        "collector (e.g. http://127.0.0.1:4318); default: off",
    )
    add_access_args(p)
    add_reliability_args(p)
    add_autoscale_args(p)


def add_access_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api-key",
        default=None,
        help=f"key every HTTP (Authorization: Bearer KEY) and gRPC (metadata authorization: "
        f"Bearer KEY) call must carry; /health and /metrics stay open (default: ${API_KEY_ENV}, "
        f"which keeps the key out of the process list; none: no key asked)",
    )
    p.add_argument("--grpc-tls-cert", default=None, help="PEM certificate chain: gRPC over TLS")
    p.add_argument("--grpc-tls-key", default=None, help="PEM private key of --grpc-tls-cert")
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=GRACE_S,
        help="on SIGTERM/SIGINT: new requests get 503/UNAVAILABLE while in-flight ones get up "
        "to this many seconds to finish; then the server exits",
    )


def _check_reachable(address: str) -> None:
    """A one-line error for a cluster address nobody answers at (ray.init would retry)."""
    import socket

    from engine.errors import SplitServeError

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SplitServeError(f"--address must be auto or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise SplitServeError(f"cannot reach the Ray cluster at {address}: {exc}") from None


def _init_ray(
    address: str | None, dashboard_port: int = DASHBOARD_PORT, node_ip: str | None = None
) -> str:
    import ray

    if address:
        if address != "auto":
            _check_reachable(address)
        ray.init(
            address=address,
            namespace="splitserve",
            logging_level=logging.WARNING,
            _node_ip_address=node_ip,
        )
        return "(the cluster's own dashboard)"
    ray.init(
        num_cpus=os.cpu_count(),
        namespace="splitserve",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        logging_level=logging.WARNING,
    )
    return f"http://127.0.0.1:{dashboard_port}"


def _cpus_per_worker(asked: float | None, cpus: float, workers: int, use_gpu: bool) -> float:
    from engine.errors import SplitServeError

    if asked is not None:
        if asked <= 0:
            raise SplitServeError(f"--cpus-per-worker must be positive, got {asked}")
        return asked
    # Ray's CPU share only schedules: torch threads are floor(share) or 1 either way
    return 1.0 if use_gpu else max(0.1, min(1.0, (cpus - 0.25) / (2 * workers)))


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def _client_access(args: argparse.Namespace) -> tuple[str | None, grpc.ServerCredentials | None]:
    """The API key and the gRPC TLS credentials, checked before anything starts."""
    from engine.errors import SplitServeError
    from router.auth import grpc_tls_credentials

    if args.shutdown_grace < 0:
        raise SplitServeError(f"--shutdown-grace must be 0 or more, got {args.shutdown_grace}")
    api_key = resolve_api_key(args.api_key)
    credentials = grpc_tls_credentials(args.grpc_tls_cert, args.grpc_tls_key)
    if api_key is None and not _is_loopback(args.host):
        print(
            f"splitserve: warning: --host {args.host} exposes the APIs to the network and no "
            f"API key is set: anyone who reaches it can use them (--api-key or ${API_KEY_ENV})",
            file=sys.stderr,
            flush=True,
        )
    return api_key, credentials


def _print_ready(args: argparse.Namespace, dashboard: str, keyed: bool, tls: bool) -> None:
    access = "API key required (not on /health, /metrics)" if keyed else "no API key asked"
    print(
        f"splitserve: OpenAI API  http://{args.host}:{args.port}/v1  "
        f"(status: /status, metrics: /metrics)\n"
        f"splitserve: gRPC       {args.host}:{args.grpc_port}  (splitserve.v1.Generation"
        f"{', TLS' if tls else ''})\n"
        f"splitserve: access     {access}\n"
        f"splitserve: Ray dashboard {dashboard}\n"
        f"splitserve: ready; Ctrl-C or SIGTERM drains (up to {args.shutdown_grace:.0f} s), stops",
        flush=True,
    )


def run_serve(args: argparse.Namespace) -> int:
    import ray

    from engine.errors import SplitServeError
    from engine.llm_engine import check_kv_capacity
    from router.autoscaler import with_autoscaler
    from router.metrics import RouterMetrics
    from router.otel import otlp_exporter
    from router.pools import PoolConfig, RayBackend
    from router.servers import serve_all

    api_key, credentials = _client_access(args)
    reliability = reliability_config(args)  # bad values fail before Ray starts
    autoscale = autoscale_config(args)
    otlp = args.otlp_endpoint
    if otlp and not otlp.startswith(("http://", "https://")):
        raise SplitServeError(f"--otlp-endpoint must be an http(s) URL, got {otlp!r}")
    dashboard = _init_ray(args.address, args.dashboard_port, args.node_ip_address)
    workers = args.prefill + args.decode
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = gpus >= workers
    cpus = ray.cluster_resources().get("CPU", 1)
    engine = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_gb=args.kv_cache_gb,
        chunked_prefill=not args.no_chunked_prefill,
        packed_gemm=not args.no_packed_gemm,
        device="cuda" if use_gpu else "cpu",
        max_tpot_ms=args.max_tpot_ms,
    )
    check_kv_capacity(engine)  # a one-line error here, not a worker's traceback later
    pools = PoolConfig(
        engine=engine,
        num_prefill=args.prefill,
        num_decode=args.decode,
        mode=args.mode,
        kv_transport=args.kv_transport,
        # a local cluster is this machine alone: KV stays on loopback
        kv_host=args.kv_host or ("" if args.address else "127.0.0.1"),
        namespace=args.namespace,
        layerwise=not args.no_layerwise,
        placement=args.placement,
        prefill_routing=args.prefill_routing,
        drain_timeout_s=args.drain_timeout,
        start_timeout_s=args.start_timeout,
        cpus_per_worker=_cpus_per_worker(args.cpus_per_worker, cpus, workers, use_gpu),
        gpus_per_worker=1.0 if use_gpu else 0.0,
        **reliability,
    )
    print(
        f"splitserve: starting {args.mode} pools "
        f"(prefill={args.prefill if args.mode == 'disaggregated' else 0}, "
        f"decode={args.decode if args.mode == 'disaggregated' else workers}, "
        f"kv transport={args.kv_transport}) for {args.model} ...",
        flush=True,
    )
    backend = RayBackend(pools, model_name=args.served_model_name or args.model)
    _print_ready(args, dashboard, api_key is not None, credentials is not None)
    exporter = otlp_exporter(args.otlp_endpoint) if args.otlp_endpoint else None
    metrics = RouterMetrics(backend.model_name, exporter=exporter)
    serving = serve_all(
        backend,
        args.host,
        args.port,
        args.grpc_port,
        metrics=metrics,
        api_key=api_key,
        grpc_credentials=credentials,
        grace_s=args.shutdown_grace,
    )
    try:
        asyncio.run(with_autoscaler(serving, backend, metrics, autoscale))
    except KeyboardInterrupt:
        pass
    finally:
        backend.shutdown()
        ray.shutdown()
    return 0
