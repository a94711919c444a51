"""`splitserve serve`: start or join Ray, start the pools, serve HTTP and gRPC until stopped."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from engine.engine_config import EngineConfig

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
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (auto|HOST:PORT); default: start a local one",
    )
    p.add_argument(
        "--dashboard-port",
        type=int,
        default=DASHBOARD_PORT,
        help="Ray dashboard port of the local cluster (not with --address)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache per worker")
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--served-model-name", default=None)


def _init_ray(address: str | None, dashboard_port: int = DASHBOARD_PORT) -> str:
    import ray

    if address:
        ray.init(address=address, namespace="splitserve", logging_level=logging.WARNING)
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


def run_serve(args: argparse.Namespace) -> int:
    import ray

    from router.pools import PoolConfig, RayBackend
    from router.servers import serve_all

    dashboard = _init_ray(args.address, args.dashboard_port)
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
        device="cuda" if use_gpu else "cpu",
    )
    pools = PoolConfig(
        engine=engine,
        num_prefill=args.prefill,
        num_decode=args.decode,
        mode=args.mode,
        kv_transport=args.kv_transport,
        layerwise=not args.no_layerwise,
        cpus_per_worker=max(0.1, min(1.0, (cpus - 0.25) / workers)) if not use_gpu else 1.0,
        gpus_per_worker=1.0 if use_gpu else 0.0,
    )
    print(
        f"splitserve: starting {args.mode} pools "
        f"(prefill={args.prefill if args.mode == 'disaggregated' else 0}, "
        f"decode={args.decode if args.mode == 'disaggregated' else workers}, "
        f"kv transport={args.kv_transport}) for {args.model} ...",
        flush=True,
    )
    backend = RayBackend(pools, model_name=args.served_model_name or args.model)
    print(
        f"splitserve: OpenAI API  http://{args.host}:{args.port}/v1  "
        f"(status: /status, metrics: /metrics)\n"
        f"splitserve: gRPC       {args.host}:{args.grpc_port}  (splitserve.v1.Generation)\n"
        f"splitserve: Ray dashboard {dashboard}\n"
        f"splitserve: ready; Ctrl-C stops",
        flush=True,
    )
    try:
        asyncio.run(serve_all(backend, args.host, args.port, args.grpc_port))
    except KeyboardInterrupt:
        pass
    finally:
        backend.shutdown()
        ray.shutdown()
    return 0


def run_status(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request

    from engine.errors import SplitServeError

    url = args.url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            status = json.load(resp)
    except (urllib.error.URLError, OSError) as exc:
        raise SplitServeError(f"cannot reach splitserve at {url}: {exc}") from None
    if args.json:
        json.dump(status, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"model {status.get('model')}  mode {status.get('mode')}  "
        f"kv transport {status.get('kv_transport', '-')}"
    )
    print(f"{'worker':<12}{'role':<14}{'running':>8}{'waiting':>8}{'kv used/total':>16}")
    for w in status.get("workers", []):
        kv = f"{w['kv_blocks_used']}/{w['kv_blocks_total']}"
        print(f"{w['name']:<12}{w['role']:<14}{w['running']:>8}{w['waiting']:>8}{kv:>16}")
    return 0
