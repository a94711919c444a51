"""`splitserve bench serve`: load-test a running server, the counterpart of `vllm bench serve`.

Sends --num-prompts streaming requests (OpenAI HTTP or gRPC) with Poisson / gamma arrivals
at --request-rate (inf: all at once), at most --max-concurrency in flight, and reports
TTFT, TPOT, ITL, E2E, throughput and (with --goodput) SLO attainment and goodput.
Failed requests are counted and their first errors reported; they never end the run.

    splitserve bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 \
        --request-rate 4 --goodput ttft:500 tpot:50 --result-json out.json --plot cdf.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import serve_metrics
from bench.serve_datasets import DATASETS, Sample, load_samples
from engine.errors import InvalidRequestError

HEALTH_TIMEOUT_S = 5.0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    p.add_argument("--backend", default="openai", choices=["openai", "grpc"])
    p.add_argument("--grpc-target", default="127.0.0.1:50051", help="host:port (--backend grpc)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="random", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--dataset-path", type=Path, default=None, help="jsonl: prompt, output_len")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument(
        "--vocab-size", type=int, default=49152, help="random token ids are drawn below this"
    )
    p.add_argument("--mean-input-len", type=float, default=256, help="synthetic-chat")
    p.add_argument("--mean-output-len", type=float, default=128, help="synthetic-chat")
    p.add_argument("--sigma", type=float, default=0.5, help="synthetic-chat lognormal sigma")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)"
    )
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument(
        "--text-prompts",
        action="store_true",
        help="random dataset: send text even to completions (servers that take no token ids)",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--arrival-seed",
        type=int,
        default=None,
        help="seed of the arrival times alone (default: --seed); fresh prompts, same arrivals",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--result-json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG of the TTFT and ITL CDFs")
    p.add_argument(
        "--hops",
        action="store_true",
        help="splitserve servers: after the run, each request's trace (GET /debug/trace/ID): "
        "where its TTFT went, hop by hop, and the median per hop",
    )
    p.add_argument("--api-key", default=None, help="for --hops (default: $SPLITSERVE_API_KEY)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def default_args(**overrides: Any) -> argparse.Namespace:
    """The CLI's defaults with `overrides` (underscored names), for calling `benchmark`."""
    p = argparse.ArgumentParser()
    add_args(p)
    args = p.parse_args([])
    for k, v in overrides.items():
        if not hasattr(args, k):
            raise TypeError(f"unknown option {k!r}")
        setattr(args, k, v)
    return args


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in serve_metrics.SLO_KEYS:
            raise InvalidRequestError(f"--goodput takes ttft:MS and/or tpot:MS, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise InvalidRequestError(f"--goodput {item!r}: {value!r} is not a number") from None
        if not ms > 0:
            raise InvalidRequestError(f"--goodput {item!r}: the threshold must be positive")
        slos[key] = ms
    return slos


def _validate(args: argparse.Namespace) -> dict[str, float]:
    if not args.request_rate > 0:
        raise InvalidRequestError(f"--request-rate must be positive, got {args.request_rate}")
    if not args.burstiness > 0:
        raise InvalidRequestError(f"--burstiness must be positive, got {args.burstiness}")
    if args.max_concurrency is not None and args.max_concurrency <= 0:
        raise InvalidRequestError(f"--max-concurrency must be positive, got {args.max_concurrency}")
    if args.dataset not in DATASETS:
        raise InvalidRequestError(
            f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}"
        )
    return parse_goodput(args.goodput)


def arrival_delays(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps before each request: gamma(shape=burstiness, mean=1/rate); 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed + 1)
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n).tolist()


# ---- clients ---------------------------------------------------------------------------------


def _new_record(sample: Sample) -> dict[str, Any]:
    return {
        "prompt_len": sample.prompt_len,
        "requested_output_len": sample.output_len,
        "start": 0.0,
        "first_token_time": None,
        "token_times": [],
        "end": 0.0,
        "output_tokens": 0,
        "prompt_tokens": 0,
        "success": False,
        "error": "",
        "id": None,  # the server's response id (OpenAI streaming)
    }


class OpenAIClient:
    def __init__(self, args: argparse.Namespace):
        import httpx

        self.args = args
        self.base = args.base_url.rstrip("/")
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.http = httpx.AsyncClient(timeout=args.timeout, limits=limits)

    async def close(self) -> None:
        await self.http.aclose()

    def _body(self, sample: Sample) -> tuple[str, dict[str, Any]]:
        a = self.args
        body: dict[str, Any] = {
            "model": a.model,
            "max_tokens": sample.output_len,
            "temperature": a.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            "seed": a.seed,
        }
        if a.ignore_eos:  # a vLLM extension: sent only when asked for, since peers may refuse it
            body["ignore_eos"] = True
        if a.endpoint == "chat":
            prompt = sample.prompt
            assert isinstance(prompt, str)
            body["messages"] = [{"role": "user", "content": prompt}]
            return f"{self.base}/v1/chat/completions", body
        body["prompt"] = sample.prompt
        return f"{self.base}/v1/completions", body

    async def send(self, sample: Sample, rec: dict[str, Any]) -> None:
        url, body = self._body(sample)
        chat = self.args.endpoint == "chat"
        rec["start"] = time.perf_counter()
        async with self.http.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                raw = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {_error_message(raw)}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(_error_message(data))
                rec["id"] = rec["id"] or event.get("id")
                for choice in event.get("choices") or []:
                    text = (
                        (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    )
                    if text:
                        rec["token_times"].append(now)
                        break
                if event.get("usage"):
                    rec["output_tokens"] = event["usage"].get("completion_tokens", 0)
                    rec["prompt_tokens"] = event["usage"].get("prompt_tokens", 0)
        rec["end"] = time.perf_counter()


def _error_message(raw: str) -> str:
    try:
        err = json.loads(raw).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg or raw)[:500]
    except (ValueError, AttributeError):
        return raw.strip()[:500]


class GrpcClient:
    def __init__(self, args: argparse.Namespace):
        import grpc

        from splitserve_proto import generation_pb2_grpc as pb_grpc

        self.args = args
        self.channel = grpc.aio.insecure_channel(args.grpc_target)
        self.stub = pb_grpc.GenerationStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    def _request(self, sample: Sample) -> Any:
        from splitserve_proto import generation_pb2 as pb

        a = self.args
        sampling = pb.SamplingOptions(
            max_tokens=sample.output_len,
            temperature=a.temperature,
            seed=a.seed,
            ignore_eos=a.ignore_eos,
        )
        req = pb.GenerateRequest(model=a.model, sampling=sampling)
        if isinstance(sample.prompt, list):
            req.token_ids.ids.extend(sample.prompt)
        elif a.endpoint == "chat":
            req.chat.messages.add(role="user", content=sample.prompt)
        else:
            req.text = sample.prompt
        return req

    async def send(self, sample: Sample, rec: dict[str, Any]) -> None:
        import grpc

        req = self._request(sample)
        rec["start"] = time.perf_counter()
        try:
            async for resp in self.stub.Generate(req, timeout=self.args.timeout):
                now = time.perf_counter()
                if resp.token_ids or resp.text:
                    rec["token_times"].append(now)
                if resp.finish_reason in ("error", "abort"):
                    raise RuntimeError(f"generation ended with finish_reason={resp.finish_reason}")
                if resp.HasField("usage"):
                    rec["output_tokens"] = resp.usage.completion_tokens
                    rec["prompt_tokens"] = resp.usage.prompt_tokens
        except grpc.aio.AioRpcError as exc:
            raise RuntimeError(f"gRPC {exc.code().name}: {exc.details()}") from None
        rec["end"] = time.perf_counter()


# ---- the run ---------------------------------------------------------------------------------


def check_reachable(args: argparse.Namespace) -> None:
    """InvalidRequestError unless the server answers within HEALTH_TIMEOUT_S."""
    if args.backend == "grpc":
        import grpc

        with grpc.insecure_channel(args.grpc_target) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=HEALTH_TIMEOUT_S)
            except grpc.FutureTimeoutError:
                raise InvalidRequestError(
                    f"cannot reach the gRPC server at {args.grpc_target} "
                    f"(not ready within {HEALTH_TIMEOUT_S:.0f} s)"
                ) from None
        return
    import httpx

    url = args.base_url.rstrip("/") + "/health"
    try:
        resp = httpx.get(url, timeout=HEALTH_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise InvalidRequestError(f"cannot reach the server at {url}: {exc}") from None
    if resp.status_code != 200:
        raise InvalidRequestError(f"the server at {url} is unhealthy (HTTP {resp.status_code})")


async def _run(
    args: argparse.Namespace, samples: list[Sample], delays: list[float]
) -> tuple[list[dict[str, Any]], float, float]:
    client: OpenAIClient | GrpcClient = (
        GrpcClient(args) if args.backend == "grpc" else OpenAIClient(args)
    )
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    records = [_new_record(s) for s in samples]
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc="requests", unit="req")

    async def one(sample: Sample, rec: dict[str, Any]) -> None:
        try:
            if sem is not None:
                async with sem:
                    await client.send(sample, rec)
            else:
                await client.send(sample, rec)
            rec["success"] = True
        except Exception as exc:  # a failed request is a data point, not the end of the run
            rec["end"] = time.perf_counter()
            rec["error"] = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
            rec["success"] = False
        if rec["token_times"]:
            rec["first_token_time"] = rec["token_times"][0]
        if bar is not None:
            bar.update(1)

    t0 = time.perf_counter()
    tasks = []
    try:
        for sample, rec, delay in zip(samples, records, delays, strict=True):
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(sample, rec)))
        await asyncio.gather(*tasks)
    finally:
        t1 = time.perf_counter()
        await client.close()
        if bar is not None:
            bar.close()
    return records, t0, t1


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark `args` describe; returns the result (config, summary, requests)."""
    slos = _validate(args)
    samples = load_samples(
        args.dataset,
        args.num_prompts,
        token_ids=args.endpoint == "completions" and not args.text_prompts,
        seed=args.seed,
        dataset_path=args.dataset_path,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        vocab_size=args.vocab_size,
        mean_input_len=args.mean_input_len,
        mean_output_len=args.mean_output_len,
        sigma=args.sigma,
    )
    check_reachable(args)
    arrival_seed = args.seed if args.arrival_seed is None else args.arrival_seed
    delays = arrival_delays(len(samples), args.request_rate, args.burstiness, arrival_seed)
    records, t0, t1 = asyncio.run(_run(args, samples, delays))
    for rec in records:  # times relative to the start of the run
        for k in ("start", "end", "first_token_time"):
            if rec[k] is not None:
                rec[k] -= t0
        rec["token_times"] = [t - t0 for t in rec["token_times"]]
    summary = serve_metrics.summarize(records, t1 - t0, slos)
    config = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("func",) and not callable(v)
    }
    if math.isinf(args.request_rate):
        config["request_rate"] = "inf"
    return {"config": config, "summary": summary, "requests": records}


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["============ Serving Benchmark Result ============"]

    def row(name: str, value: Any, fmt: str = "{:.2f}") -> None:
        text = "-" if value is None else fmt.format(value)
        lines.append(f"{name:<40}{text:>10}")

    row("Successful requests:", summary["completed"], "{}")
    row("Failed requests:", summary["failed"], "{}")
    row("Benchmark duration (s):", summary["duration_s"])
    row("Total input tokens:", summary["total_input_tokens"], "{}")
    row("Total generated tokens:", summary["total_output_tokens"], "{}")
    row("Request throughput (req/s):", summary["request_throughput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    if "goodput" in summary:
        row("Request goodput (req/s):", summary["goodput"])
        row("SLO attainment (%):", 100 * (summary["slo_attainment"] or 0.0))
    for key, title in (
        ("ttft_ms", "Time to First Token"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)"),
        ("itl_ms", "Inter-token Latency"),
        ("e2e_ms", "End-to-end Latency"),
    ):
        lines.append(f"{'-' * 15}{title}{'-' * 15}")
        name = key.split("_")[0].upper()
        for stat, value in summary[key].items():
            row(f"{stat.capitalize()} {name} (ms):", value)
    for err in summary["errors"]:
        lines.append(f"error: {err}")
    lines.append("=" * 50)
    return "\n".join(lines)


def step_cdf(ax: Any, values: Sequence[float], label: str | None = None) -> None:
    """The empirical CDF of `values` as a step line on matplotlib axes `ax`."""
    if values:
        xs = np.sort(values)
        ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=label)


def plot_cdfs(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = serve_metrics.latency_series_ms(records)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (name, values) in zip(axes, series.items(), strict=True):
        step_cdf(ax, values)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("CDF")
        ax.set_title(f"{name} CDF ({len(values)} samples)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    result = benchmark(args)
    print(format_summary(result["summary"]))
    if args.hops:
        from bench import hops

        hops.attach_hops(result["requests"], args.base_url, args.api_key)
        result["hops"] = hops.summarize(result["requests"])
        print(hops.format_summary(result["hops"]))
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.result_json}")
    if args.plot:
        plot_cdfs(result["requests"], args.plot)
        print(f"wrote {args.plot}")
    return 0
