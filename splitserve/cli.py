"""The `splitserve` command line: serve, status, top, scale, generate (offline), bench, sim, plan.

A thin entry: each subcommand parses its arguments and hands them to router
(serve, status, scale), splitserve.top (top), bench, sim (sim, plan) or engine
(generate); no package imports this one.

Bad input ends with one line on stderr (`error: ...`) and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model name, .gguf file or HF dir")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="auto (default): bfloat16 where the CPU or GPU computes it natively (AMX, "
        "AVX512-BF16, a bf16 GPU), else float32",
    )
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        block_size=args.block_size,
        num_threads=args.threads,
    )
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate(args.prompt, params)[0]
    print(out.text)
    t = out.timings
    print(
        f"[{len(out.token_ids)} tokens, finish={out.finish_reason}, "
        f"ttft={t.ttft_s * 1000:.0f} ms, e2e={t.e2e_s:.2f} s]",
        file=sys.stderr,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from router.serve import run_serve

    return run_serve(args)


def _status(args: argparse.Namespace) -> int:
    from router.admin_client import run_status

    return run_status(args)


def _bench(args: argparse.Namespace) -> int:
    from bench.offline import run_offline_bench

    return run_offline_bench(args)


# One function a subcommand: a new one is a `_add_<name>(sub)` below and one line in
# `build_parser`. Each imports its package only when it builds its subparser.
def _add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gen = sub.add_parser("generate", help="generate offline for one prompt")
    _add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_generate)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from router.serve import add_serve_args

    serve = sub.add_parser("serve", help="serve the OpenAI HTTP and gRPC APIs on Ray pools")
    add_serve_args(serve)
    serve.set_defaults(func=_serve)


def _add_api_key_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api-key", default=None, help="the server's API key (default: $SPLITSERVE_API_KEY)"
    )


def _add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser("status", help="print the pools of a running server")
    status.add_argument("--url", default="http://127.0.0.1:8000")
    status.add_argument("--json", action="store_true")
    _add_api_key_arg(status)
    status.set_defaults(func=_status)


def _top(args: argparse.Namespace) -> int:
    from splitserve.top import run_top

    return run_top(args)


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _add_top(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    top = sub.add_parser(
        "top", help="live view of a running server: workers, queues, KV use, latency percentiles"
    )
    top.add_argument("--url", default="http://127.0.0.1:8000")
    top.add_argument("--interval", type=_positive_seconds, default=2.0, help="seconds a frame")
    top.add_argument("--once", action="store_true", help="print one frame (all-time) and exit")
    _add_api_key_arg(top)
    top.set_defaults(func=_top)


def _scale(args: argparse.Namespace) -> int:
    from router.admin_client import run_scale

    return run_scale(args)


def _add_scale(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    scale = sub.add_parser("scale", help="resize a running server's pools (drains removed workers)")
    scale.add_argument("--url", default="http://127.0.0.1:8000")
    scale.add_argument("--prefill", type=int, default=None, help="prefill workers wanted")
    scale.add_argument("--decode", type=int, default=None, help="decode workers wanted")
    scale.add_argument("--colocated", type=int, default=None, help="colocated workers wanted")
    scale.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for the pools to settle"
    )
    _add_api_key_arg(scale)
    scale.set_defaults(func=_scale)


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from bench import (
        autoscale_bench,
        hops,
        overload_bench,
        peer_compare,
        prefix_bench,
        serve_bench,
        serving,
        sim_fit,
        sim_validate,
        step_profile,
        sweep,
    )
    from bench.offline import add_offline_args

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    # name, help, add its arguments, run it
    commands = [
        ("offline", "continuous vs static, vs HF, roofline", add_offline_args, _bench),
        ("kv", "KV-transfer bandwidth: gRPC vs raw socket", serving.add_kv_args, serving.run_kv),
        (
            "ttft",
            "TTFT: disaggregated vs colocated, low load",
            serving.add_ttft_args,
            serving.run_ttft,
        ),
        (
            "serve",
            "load-test a running server (vllm bench serve)",
            serve_bench.add_args,
            serve_bench.run,
        ),
        (
            "autoscale",
            "a load ramp against the SLO autoscaler: pools and attainment over time",
            autoscale_bench.add_args,
            autoscale_bench.run,
        ),
        (
            "hops",
            "where TTFT goes, hop by hop, at a low and a high load (a server it starts)",
            hops.add_args,
            hops.run,
        ),
        (
            "sweep",
            "goodput under TTFT/TPOT SLOs: disaggregated vs colocated, rate sweep",
            sweep.add_args,
            sweep.run,
        ),
        (
            "peer",
            "the same load on a peer (HF `transformers serve`, vLLM CPU) and on us",
            peer_compare.add_peer_args,
            peer_compare.run_peer_compare,
        ),
        (
            "prefix",
            "shared prefixes: prefix-aware vs random prefill routing, TTFT, hit rate",
            prefix_bench.add_args,
            prefix_bench.run,
        ),
        (
            "overload",
            "offered load at 10x capacity: 429s with Retry-After, 0 5xx, admitted TPOT, memory",
            overload_bench.add_args,
            overload_bench.run,
        ),
        (
            "step",
            "where a decode step's time goes: phases and top ops, per batch size",
            step_profile.add_args,
            step_profile.run,
        ),
        (
            "sim-fit",
            "time the engine's steps here and fit the simulator's CPU cost model",
            sim_fit.add_args,
            sim_fit.run,
        ),
        (
            "sim-validate",
            "the same workloads on the real system and in the simulator, with the error",
            sim_validate.add_args,
            sim_validate.run,
        ),
    ]
    for name, help_text, add_args, run in commands:
        parser = bench_sub.add_parser(name, help=help_text)
        add_args(parser)
        parser.set_defaults(func=run)


def _add_sim(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sim.commands import add_plan_args, add_sim_args, run_plan, run_sim

    sim = sub.add_parser(
        "sim", help="simulate a cluster: the real scheduler, routing and autoscaler, virtual clock"
    )
    add_sim_args(sim)
    sim.set_defaults(func=run_sim)
    plan = sub.add_parser(
        "plan", help="the cheapest prefill/decode counts that hold an SLO, vs colocated"
    )
    add_plan_args(plan)
    plan.set_defaults(func=run_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    _add_status(sub)
    _add_top(sub)
    _add_scale(sub)
    _add_bench(sub)
    _add_sim(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.errors import SplitServeError

    try:
        return args.func(args)
    except SplitServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `splitserve generate ... | head -1`: the reader left
        # point stdout at /dev/null so that the interpreter's final flush stays quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process killed by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
