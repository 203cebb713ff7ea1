"""Figure-4-style plots: memory and latency against predicted loss, one panel per batch size.

Lines: parameter scaling (the paper's ladder at P = 1) and one per P (the same sizes with
P streams); the base model's path by ParScale and by parameter scaling is drawn bold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from parscale.cost.roofline import non_embedding_params
from parscale.cost.compare import LADDER, Comparator, Reference, ladder_index
from parscale.atomic import atomic_save_figure


def _ladder_loss(ref: Reference, i: int, p: int, prefix_tokens: int) -> float | None:
    if ref.observed is not None:
        return ref.observed.get((i, p))
    return ref.law.loss(non_embedding_params(LADDER[i], p, prefix_tokens), p)


def plot_compare(base: Any, ref: Reference, rows: list[dict[str, Any]], cmp: Comparator, path: Path) -> None:
    """Write the PNG atomically (temp file in the same folder, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch_size"] for r in rows})
    streams = sorted({r["P"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(4.2 * len(batches), 7), squeeze=False)
    on_ladder = ladder_index(base) is not None
    for col, batch in enumerate(batches):
        mine = sorted((r for r in rows if r["batch_size"] == batch), key=lambda r: r["P"])
        for row_i, (key, unit, scale) in enumerate((("memory_gib", "memory (GiB)", 1.0), ("latency_s", "latency (ms)", 1e3))):
            ax = axes[row_i][col]
            if on_ladder:
                for p in [1, *streams]:
                    pts = [(_ladder_loss(ref, i, p, cmp.workload.prefix_tokens),
                            getattr(cmp.costs(s, p, batch), key) * scale) for i, s in enumerate(LADDER)]
                    pts = [pt for pt in pts if pt[0] is not None]
                    label = "parameter scaling (P=1)" if p == 1 else f"P={p}"
                    ax.plot(*zip(*pts), marker="o", ms=3, lw=1, alpha=0.6, label=label)
            base_pt = (mine[0]["loss_base"], mine[0][f"{key}_base"] * scale)
            par = [base_pt] + [(r["loss_parscale"], r[f"{key}_parscale"] * scale) for r in mine]
            prm = [base_pt] + [(r["loss_parscale"], r[f"{key}_param"] * scale) for r in mine]
            ax.plot(*zip(*prm), "k--", lw=2, label="base: parameter scaling")
            ax.plot(*zip(*par), "r-", lw=2.5, marker="*", ms=9, label="base: ParScale")
            ax.invert_xaxis()
            ax.set_xlabel(f"predicted loss ({ref.name})")
            ax.set_ylabel(unit)
            ax.set_title(f"batch size {batch}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    lengths = ",".join(str(n) for n in cmp.lengths)
    fig.suptitle(f"Inference cost vs loss on {cmp.hw.name} (input = output, averaged over {lengths})")
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
