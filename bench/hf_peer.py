"""`splitserve bench peer`: the same `bench serve` workload against HF `transformers serve
--continuous-batching` and against splitserve, on the same machine, side by side.

    model (name / .gguf / HF dir) --write_hf_copy--> HF dir (config, safetensors, tokenizer)
        |                                                 |
        | splitserve serve --model M --dtype D            | transformers serve --continuous-batching
        v                                                 v
    bench serve (seed S: the same text prompts, temperature 0, stop at EOS) -> two results

The peer serves a plain `LlamaForCausalLM` holding splitserve's own weights (`load_hf_model`),
in the same dtype, with generation_config stopping on splitserve's stop tokens. At temperature 0
in float32 both generate the same greedy text for the same prompts; in bfloat16 rounding parts
their greedy paths after some tokens, so one may stop at EOS where the other goes on: the table
shows both total output token counts, and a note when they differ. The peer runs first, then
splitserve, never both at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import serve_bench
from bench.server_process import ServerProcess, free_port, stop_group, wait_healthy
from engine.errors import InvalidRequestError

MARKER = "splitserve_source.json"  # written last: its presence means the copy is complete
DTYPE_CHOICES = ("bfloat16", "float32")  # what `splitserve serve --dtype` takes
CB_PAGE_SIZE = 256  # tokens per block of transformers' continuous batching (its default)
_SET_BY_PEER = ("--model", "--dtype", "--port", "--grpc-port", "--served-model-name")


def _copy_marker(source: Path, dtype: str) -> dict[str, Any]:
    files = [source, *source.iterdir()] if source.is_dir() else [source]
    mtime_ns = max(f.stat().st_mtime_ns for f in files)
    return {"source": str(source.resolve()), "dtype": dtype, "source_mtime_ns": mtime_ns}


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_hf_copy(model: str, out_dir: Path, dtype: str) -> Path:
    """An HF-format copy of `model` (weights, config, generation_config, tokenizer with chat
    template) in `dtype` at `out_dir`; skipped when `out_dir` already holds one of the same
    source and dtype. Returns `out_dir`."""
    from engine.loader import is_gguf, resolve_model

    if dtype not in DTYPE_CHOICES:
        raise InvalidRequestError(f"unsupported dtype {dtype!r}; choose {', '.join(DTYPE_CHOICES)}")
    source = resolve_model(model)
    out_dir = Path(out_dir)
    if source.resolve() == out_dir.resolve():
        raise InvalidRequestError(f"the HF copy of {model!r} cannot overwrite its source")
    marker = _copy_marker(source, dtype)
    found = _read_marker(out_dir)
    if found == marker:
        return out_dir
    if found is None and out_dir.is_dir() and any(out_dir.iterdir()):
        raise InvalidRequestError(
            f"{out_dir} holds files splitserve did not write (no {MARKER}); choose a new directory"
        )
    (out_dir / MARKER).unlink(missing_ok=True)  # a half-written copy must not look complete
    _save_hf_copy(source, out_dir, dtype, gguf=is_gguf(source))
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir


def _save_hf_copy(source: Path, out_dir: Path, dtype: str, gguf: bool) -> None:
    from transformers import AutoTokenizer

    from bench.hf_baseline import load_hf_model
    from engine.loader import load_tokenizer

    hf = load_hf_model(str(source), dtype)
    ours = load_tokenizer(source)
    # Stop where splitserve stops (EOS and the end-of-turn tokens), so both do the same work.
    stop_ids = sorted(ours.stop_token_ids)
    for cfg in (hf.config, hf.generation_config):
        cfg.bos_token_id = ours.bos_token_id
        cfg.eos_token_id = ours.eos_token_id
    hf.generation_config.eos_token_id = stop_ids
    hf.generation_config.pad_token_id = ours.eos_token_id
    hf.save_pretrained(out_dir)
    if gguf:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.save_pretrained(out_dir)


def kv_cache_blocks(hf_dir: Path, dtype: str, kv_cache_gb: float) -> int:
    """`--cb-num-blocks` for a KV cache of `kv_cache_gb`: a block is CB_PAGE_SIZE tokens of K
    and V in every layer."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    itemsize = 4 if dtype == "float32" else 2
    per_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * itemsize
    return max(1, int(kv_cache_gb * 2**30) // (per_token * CB_PAGE_SIZE))


class PeerServer:
    """`transformers serve --continuous-batching` on CPU, on a free port, as a subprocess in its
    own process group; its output goes to `log_path`. `threads`: OMP_NUM_THREADS (transformers
    serve has no option for torch threads; torch's default is every core). `kv_cache_gb` and
    `max_batch_tokens` bound its paged KV cache and the attention masks planned for it (by
    default it fills 60% of the machine's RAM with them on the first request: ~14 GB and ~25 s
    on a 23 GB box); 2048 tokens is splitserve's default max_num_batched_tokens."""

    def __init__(
        self,
        hf_dir: Path,
        dtype: str,
        log_path: Path,
        *,
        kv_cache_gb: float = 2.0,
        max_batch_tokens: int = 2048,
        threads: int | None = None,
        start_timeout_s: float = 240.0,
    ):
        self.model = str(Path(hf_dir).resolve())  # requests must send this very name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        command = [
            sys.executable, "-m", "transformers.cli.transformers", "serve", "--continuous-batching",
            "--device", "cpu", "--dtype", dtype, "--host", "127.0.0.1", "--port", str(self.port),
            "--cb-num-blocks", str(kv_cache_blocks(Path(hf_dir), dtype, kv_cache_gb)),
            "--cb-max-batch-tokens", str(max_batch_tokens),
            "--log-level", "warning", self.model,
        ]  # fmt: skip
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        if not wait_healthy(self.proc, self.base + "/health", start_timeout_s):
            raise RuntimeError(
                f"transformers serve exited ({self.proc.returncode}):\n{self.log()[-4000:]}"
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_group(self.proc, grace_s=3)  # its CB thread may keep it alive after uvicorn stops

    def __enter__(self) -> PeerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- splitserve bench peer -------------------------------------------------------------------

PEER, OURS = "transformers serve", "splitserve"
_ROWS = (
    ("Successful requests", "completed", None, "{}"),
    ("Failed requests", "failed", None, "{}"),
    ("Total input tokens", "total_input_tokens", None, "{}"),
    ("Total output tokens", "total_output_tokens", None, "{}"),
    ("Request throughput (req/s)", "request_throughput", None, "{:.2f}"),
    ("Output token throughput (tok/s)", "output_throughput", None, "{:.2f}"),
    ("Mean TTFT (ms)", "ttft_ms", "mean", "{:.1f}"),
    ("Median TTFT (ms)", "ttft_ms", "median", "{:.1f}"),
    ("P99 TTFT (ms)", "ttft_ms", "p99", "{:.1f}"),
    ("Median TPOT (ms)", "tpot_ms", "median", "{:.1f}"),
    ("P99 TPOT (ms)", "tpot_ms", "p99", "{:.1f}"),
    ("Median ITL (ms)", "itl_ms", "median", "{:.1f}"),
    ("P99 ITL (ms)", "itl_ms", "p99", "{:.1f}"),
    ("Median E2E (ms)", "e2e_ms", "median", "{:.1f}"),
)


def add_peer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model name, .gguf file or HF dir")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES)
    p.add_argument(
        "--hf-dir", type=Path, default=None, help="default: bench/results/hf-MODEL-DTYPE"
    )
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument(
        "--request-rate", type=float, default=1.0, help="requests/s, Poisson (inf: all at once)"
    )
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--random-input-len", type=int, default=256, help="words per random prompt")
    p.add_argument("--random-output-len", type=int, default=64, help="max_tokens per request")
    p.add_argument("--seed", type=int, default=0, help="the prompts and arrivals (same for both)")
    p.add_argument(
        "--splitserve-args",
        default="",
        help='extra `splitserve serve` flags, one string: --splitserve-args="--mode colocated"',
    )
    p.add_argument(
        "--peer-threads", type=int, default=None, help="transformers serve's OMP_NUM_THREADS"
    )
    p.add_argument(
        "--peer-kv-cache-gb", type=float, default=2.0, help="transformers serve's KV cache size"
    )
    p.add_argument("--result-json", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _validate(args: argparse.Namespace) -> list[str]:
    """The `splitserve serve` flags of --splitserve-args; InvalidRequestError for bad options."""
    for name in ("num_prompts", "request_rate", "random_input_len", "random_output_len"):
        if not getattr(args, name) > 0:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be positive")
    if not args.peer_kv_cache_gb > 0:
        raise InvalidRequestError("--peer-kv-cache-gb must be positive")
    for name in ("max_concurrency", "peer_threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be positive")
    try:
        serve_args = shlex.split(args.splitserve_args)
    except ValueError as exc:
        raise InvalidRequestError(f"--splitserve-args: {exc}") from None
    for flag in serve_args:
        if flag.split("=", 1)[0] in _SET_BY_PEER:
            raise InvalidRequestError(
                f"--splitserve-args cannot set {flag.split('=', 1)[0]}: bench peer sets it"
            )
    return serve_args


def default_hf_dir(model: str, dtype: str) -> Path:
    name = Path(model).stem if ("/" in model or model.endswith(".gguf")) else model
    return Path(__file__).resolve().parent / "results" / f"hf-{name}-{dtype}"


def _workload(args: argparse.Namespace, base_url: str, model: str, **overrides: Any):
    """The `bench serve` options: text prompts (the peer takes no token ids), greedy, stop at
    EOS (the peer refuses ignore_eos)."""
    options = {
        "base_url": base_url,
        "model": model,
        "endpoint": args.endpoint,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "seed": args.seed,
        "text_prompts": True,
        "temperature": 0.0,
        "ignore_eos": False,
        "no_progress": args.no_progress,
    }
    return serve_bench.default_args(**{**options, **overrides})


def measure(name: str, base_url: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """One warm-up request (another seed: no prefix-cache hit), then the workload."""
    warm_up = _workload(
        args, base_url, model, num_prompts=1, seed=args.seed + 1, request_rate=float("inf"),
        no_progress=True,
    )  # fmt: skip
    summary = serve_bench.benchmark(warm_up)["summary"]
    if summary["failed"]:
        raise RuntimeError(f"{name}: the warm-up request failed: {summary['errors'][0]}")
    print(f"{name}: {args.num_prompts} requests at {args.request_rate} req/s")
    return serve_bench.benchmark(_workload(args, base_url, model))


def format_comparison(results: dict[str, dict[str, Any]]) -> str:
    """Side by side summaries, one column per server."""
    names = list(results)
    lines = [f"{'':<34}" + "".join(f"{n:>20}" for n in names)]
    for title, key, stat, fmt in _ROWS:
        cells = []
        for name in names:
            value = results[name]["summary"][key]
            value = value[stat] if stat else value
            cells.append("-" if value is None else fmt.format(value))
        lines.append(f"{title:<34}" + "".join(f"{c:>20}" for c in cells))
    for name in names:
        lines += [f"{name} error: {err}" for err in results[name]["summary"]["errors"]]
    rule = "=" * len(lines[0])
    return "\n".join([rule, *lines, rule])


def run_peer_compare(args: argparse.Namespace) -> int:
    serve_args = _validate(args)
    hf_dir = args.hf_dir or default_hf_dir(args.model, args.dtype)
    print(f"HF copy of {args.model} ({args.dtype}): {hf_dir}")
    write_hf_copy(args.model, hf_dir, args.dtype)
    log_path = hf_dir.with_name(hf_dir.name + "-serve.log")
    peer_options = {"kv_cache_gb": args.peer_kv_cache_gb, "threads": args.peer_threads}
    with PeerServer(hf_dir, args.dtype, log_path, **peer_options) as peer:
        results = {PEER: measure(PEER, peer.base, peer.model, args)}
    if "CB: False" in peer.log() or "CB: True" not in peer.log():
        print(f"warning: transformers serve did not batch continuously; see {log_path}")
    with ServerProcess("--model", args.model, "--dtype", args.dtype, *serve_args) as server:
        results[OURS] = measure(OURS, server.base, args.model, args)
    print(format_comparison(results))
    totals = [r["summary"]["total_output_tokens"] for r in results.values()]
    if totals[0] != totals[1]:
        print(f"note: the servers generated {totals[0]} vs {totals[1]} tokens (EOS at other steps)")
    if args.result_json:
        out = {"hf_dir": str(hf_dir), "peer_log": str(log_path), "splitserve_args": serve_args}
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps({**out, **results}, indent=2) + "\n")
        print(f"wrote {args.result_json}")
    return 0
