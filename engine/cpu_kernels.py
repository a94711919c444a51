"""splitserve's C++ CPU kernels (engine/csrc/*.cpp), built into one module per machine.

    csrc/paged_decode.cpp   decode attention over the paged KV cache (engine.cpu_attention)
    csrc/elementwise.cpp    fused SwiGLU and residual add + RMSNorm, for bf16 (engine.model)
    csrc/rope_kv.cpp        rotary embedding and the KV-cache write in one pass, bf16 (engine.model)
    csrc/amx_linear.cpp     bf16 linear layers on AMX tiles, for decode's row counts (engine.linear)
    csrc/prefill_attention.cpp  causal attention of whole prompts on AMX tiles, bf16
                            (engine.cpu_attention)
    csrc/decode_layers.cpp  a decode step's decoder layers in one call, bf16 on AMX
                            (engine.fused_decode): its ops (csrc/decode_ops.cpp) on the
                            threads of csrc/team.cpp
    csrc/items.h            the kernels' per-item bodies, which decode_layers runs
    csrc/vec512.h           the AVX-512 helpers they share; csrc/amx_tiles.h the AMX tile config
    csrc/copy_crc.cpp       KV pages copied and CRC-32C'd in one pass (kv_transfer.page_copy)
    csrc/kernels.h          the kernels' entry points; csrc/bindings.cpp the Python module

torch's cpp_extension builds them once (gcc, -O3 -march=native, OpenMP), cached under
TORCH_EXTENSIONS_DIR by a name that carries a hash of this CPU's model and flags (a build
for -march=native is only loaded on the kind of CPU it was built for: elsewhere it would
crash on SIGILL) and of the sources (an edited source builds anew). `make setup` builds it;
where it cannot be built (no compiler), `load()` says so once and callers take torch's ops.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import platform
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
_SOURCES = (
    "paged_decode.cpp",
    "elementwise.cpp",
    "amx_linear.cpp",
    "rope_kv.cpp",
    "prefill_attention.cpp",
    "decode_layers.cpp",
    "decode_ops.cpp",
    "team.cpp",
    "copy_crc.cpp",
    "bindings.cpp",
)
_HEADERS = ("vec512.h", "amx_tiles.h", "kernels.h", "items.h", "team.h", "decode_ops.h")


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:10]


def _source_tag() -> str:
    digest = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS):
        digest.update((CSRC / name).read_bytes())
    return digest.hexdigest()[:8]


@functools.cache
def load() -> ModuleType | None:
    """The built module, or None (logged once) where it cannot be built."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        from torch.utils.cpp_extension import load as build

        name = f"splitserve_cpu_kernels_{_cpu_tag()}_{_source_tag()}"
        with _build_lock(Path(_get_build_directory(name, False))):
            return build(
                name=name,
                sources=[str(CSRC / src) for src in _SOURCES],
                extra_include_paths=[str(CSRC)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
    except Exception as exc:  # no compiler, no ninja: the torch path serves
        log.warning("splitserve: CPU kernels unavailable (%s); using torch's ops", exc)
        return None


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """One process at a time builds or loads the module; the lock goes with its holder.

    torch's own lock is a file that a build creates and removes: a process killed while it
    builds (a Ctrl-C during `make serve`'s first start, a stopped worker) leaves it behind,
    and every later load then waits for it forever. Under this flock, which the OS releases
    when its holder dies, a torch lock file found is such a leftover, and is removed."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "splitserve.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                log.warning("splitserve: removing %s, left by a build that did not finish", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def warm(device: torch.device) -> None:
    """Build or load the kernels now (not in an engine step) where they will be used."""
    if device.type == "cpu":
        load()


if __name__ == "__main__":  # `make setup` builds it once, so no worker waits for the compiler
    logging.basicConfig(level=logging.INFO)
    print("CPU kernels:", "built" if load() is not None else "unavailable (torch's ops serve)")
