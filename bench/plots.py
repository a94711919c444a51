"""One PNG summarizing an offline benchmark result (the dict `bench.offline` writes as JSON)."""

from __future__ import annotations

from pathlib import Path


def plot_offline(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = result["experiments"]
    panels = [name for name in ("continuous_vs_static", "vs_hf", "roofline") if name in exps]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    drawers = {"continuous_vs_static": _cvs, "vs_hf": _hf, "roofline": _roofline}
    for ax, name in zip(axes[0], panels, strict=True):
        drawers[name](ax, exps[name], exps.get("kv_waste"))
    m = result["machine"]
    fig.suptitle(
        f"splitserve offline — {m['cpu_model']}, {m['threads']} threads, {m['dtype']}", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cvs(ax, exp: dict, waste: dict | None) -> None:
    runs = exp["runs"]
    x = range(len(runs))
    cont = [r["continuous"]["tokens_per_s"] for r in runs]
    static = [r["static"]["tokens_per_s"] for r in runs]
    ax.bar([i - 0.2 for i in x], cont, 0.4, label="continuous")
    ax.bar([i + 0.2 for i in x], static, 0.4, label="static")
    for i, r in enumerate(runs):
        ax.annotate(
            f"{r['ratio']:.2f}x\n(ideal {r['ideal_ratio_flat_step_cost']:.2f}x)",
            (i, max(cont[i], static[i])),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(x), [f"cap {r['cap']}" for r in runs])
    ax.set_ylabel("output tokens/s")
    title = f"continuous vs static (max_num_seqs={exp['max_num_seqs']})"
    if waste is not None:
        title += f"\nKV waste at cap {waste['cap']}: {waste['kv_waste']:.1%}"
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.25)
    ax.legend(fontsize=8)


def _hf(ax, exp: dict, _waste: dict | None) -> None:
    values = [exp["splitserve"]["tokens_per_s"], exp["hf"]["tokens_per_s"]]
    ax.bar(["splitserve\n(continuous)", "HF generate\n(padded)"], values, color=["C0", "C2"])
    ax.set_ylabel("useful output tokens/s")
    ax.set_title(
        f"vs HF transformers, batch {exp['batch_size']}, cap {exp['cap']}: {exp['ratio']:.2f}x",
        fontsize=9,
    )
    ax.margins(y=0.15)


def _roofline(ax, exp: dict, _waste: dict | None) -> None:
    pts = exp["points"]
    b = [p["batch_size"] for p in pts]
    ax.plot(b, [p["step_s"] * 1e3 for p in pts], "o-", label="measured step")
    ax.plot(b, [p["bound_s"] * 1e3 for p in pts], "s--", label="roofline bound")
    for p in pts:
        ax.annotate(
            f"{p['fraction_of_bound']:.0%}",
            (p["batch_size"], p["step_s"] * 1e3),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("decode batch size")
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"decode roofline ({exp['copy_gbs']:.0f} GB/s copy)", fontsize=9)
    ax.legend(fontsize=8)
