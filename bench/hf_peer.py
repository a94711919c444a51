"""`splitserve bench peer`'s HF side: the HF-format copy of the model every peer serves, and
the `transformers serve --continuous-batching` peer (bench/peer_compare.py runs the comparison,
bench/vllm_peer.py the vLLM peer).

    model (name / .gguf / HF dir) --write_hf_copy--> HF dir (config, safetensors, tokenizer)
        |                                                 |
        | splitserve serve --model M --dtype D            | transformers serve --continuous-batching
        v                                                 v                    (PeerServer)
    bench serve (seed S: the same text prompts, temperature 0, stop at EOS) -> two results

The peer serves a plain `LlamaForCausalLM` holding splitserve's own weights (`load_hf_model`),
in the same dtype, with generation_config stopping on splitserve's stop tokens. At temperature 0
in float32 both generate the same greedy text for the same prompts; in bfloat16 rounding parts
their greedy paths after some tokens, so one may stop at EOS where the other goes on: the table
shows both total output token counts, and a note when they differ. The peer runs first, then
splitserve, never both at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.server_process import free_port, stop_group, wait_healthy
from engine.errors import InvalidRequestError

MARKER = "splitserve_source.json"  # written last: its presence means the copy is complete
DTYPE_CHOICES = ("bfloat16", "float32")  # what `splitserve serve --dtype` takes
CB_PAGE_SIZE = 256  # tokens per block of transformers' continuous batching (its default)


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


def default_hf_dir(model: str, dtype: str) -> Path:
    name = Path(model).stem if ("/" in model or model.endswith(".gguf")) else model
    return Path(__file__).resolve().parent / "results" / f"hf-{name}-{dtype}"
