"""The printed summary table and the JSON text of an offline benchmark result."""

from __future__ import annotations

import json
import math


def result_json_text(result: dict) -> str:
    """Strict JSON: NaN (an undefined ratio) becomes null."""
    return json.dumps(_finite(result), indent=2, allow_nan=False) + "\n"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def format_summary(result: dict) -> str:
    """The human-readable table printed at the end of a run."""
    exps = result["experiments"]
    m = result["machine"]
    lines = [
        f"machine: {m['cpu_model']}, {m['cores']} cores, torch {m['torch_version']}, "
        f"{m['dtype']}, {m['threads']} threads, load {m['loadavg_1m_start']:.1f} at start"
    ]
    sections = {
        "continuous_vs_static": _continuous_vs_static,
        "kv_waste": _kv_waste,
        "vs_hf": _vs_hf,
        "roofline": _roofline,
    }
    for name, section in sections.items():
        if name in exps:
            lines += section(exps[name])
    return "\n".join(lines)


def _goal(text: str, met: bool) -> str:
    return f"goal {text}: {'met' if met else 'MISSED'}"


def _x(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}x"


def _continuous_vs_static(e: dict) -> list[str]:
    lines = [
        f"continuous vs static (max_num_seqs={e['max_num_seqs']}; ideal = static steps / "
        "continuous steps, the ratio if a step cost the same at any batch size)",
        f"{'cap':>6} {'tokens':>7} {'cont tok/s':>11} {'static tok/s':>13} {'ratio':>7} "
        f"{'ideal':>7}",
    ]
    for r in e["runs"]:
        lines.append(
            f"{r['cap']:>6} {r['output_tokens']:>7} {r['continuous']['tokens_per_s']:>11.1f} "
            f"{r['static']['tokens_per_s']:>13.1f} {_x(r['ratio']):>7} "
            f"{_x(r['ideal_ratio_flat_step_cost']):>7}"
        )
    g = e["goal"]
    lines.append(_goal(f"ratio at cap {g['cap']} >= {g['min_ratio']:.0f}x", g["met"]))
    return lines


def _kv_waste(e: dict) -> list[str]:
    goal = _goal(f"<= {e['goal']['max_waste']:.0%}", e["goal"]["met"])
    return [f"KV waste (block {e['block_size']}, cap {e['cap']}): {e['kv_waste']:.2%}  {goal}"]


def _vs_hf(e: dict) -> list[str]:
    goal = _goal(f">= {e['goal']['min_ratio']:.0f}x", e["goal"]["met"])
    return [
        f"vs HF generate (batch {e['batch_size']}, cap {e['cap']}): splitserve "
        f"{e['splitserve']['tokens_per_s']:.1f} tok/s, HF {e['hf']['tokens_per_s']:.1f} useful "
        f"tok/s ({e['hf']['decoded_tokens']} decoded for {e['hf']['useful_tokens']}), "
        f"{_x(e['ratio'])}  {goal}"
    ]


def _roofline(e: dict) -> list[str]:
    peaks = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in e["matmul_gflops"].items())
    lines = [
        f"roofline: matmul {peaks}; copy {e['copy_gbs']:.1f} GB/s (read + write)",
        f"{'batch':>6} {'context':>8} {'step ms':>8} {'bound ms':>9} {'bound by':>9} "
        f"{'bound/actual':>13}",
    ]
    for p in e["points"]:
        lines.append(
            f"{p['batch_size']:>6} {p['context_len']:>8.0f} {p['step_s'] * 1e3:>8.1f} "
            f"{p['bound_s'] * 1e3:>9.1f} {p['bound_by']:>9} {p['fraction_of_bound']:>13.1%}"
        )
    return lines
