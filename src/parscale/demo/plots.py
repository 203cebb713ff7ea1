"""The demo's plots of our own runs (the law and cost plots come from `parscale.law` and
`parscale.cost`). Each reads only the summary, so it can be redrawn from `summary.json`.
The `law` budget draws its own set: loss against N per P, the comparisons, the curves."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from parscale.atomic import atomic_save_figure
from parscale.demo.plan import LAW_DESIGNS

# One look per kind of run, the same in every plot, and its legend entry in the loss-vs-P plot.
STYLE = {"p1": ("tab:blue", "o"), "streams": ("tab:orange", "s"), "prefix": ("tab:green", "^"),
         "wide": ("tab:purple", "D")}
LEGEND = {"p1": "P=1 from scratch (the baseline)", "streams": "P>1 streams, from scratch",
          "prefix": "P=1 + one prefix (control)", "wide": "P=1 wider (1.27x params)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _main_runs(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The from-scratch and two-stage runs of the tiny model (the sizes and attempts have their own tables)."""
    return [r for r in summary["runs"] if r["group"] in ("scratch", "two-stage")]


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    """Validation loss against tokens seen, every run (two-stage runs start after their source)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    by = {r["name"]: r for r in summary["runs"]}
    for r in summary["runs"]:
        per = r["tokens"] / r["steps"]
        offset = by[r["source"]]["tokens"] if r["source"] in by else 0
        xs = [offset + s * per for s, _ in r["val_curve"]]
        ls = "--" if r["source"] else "-"
        ax.plot(xs, [v for _, v in r["val_curve"]], ls, marker=".", label=f"{r['name']} ({r['val_loss']:.3f})")
    ax.set_xlabel("training tokens seen (two-stage runs continue from their source)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("validation curves, every run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def plot_loss_vs_p(summary: dict[str, Any], path: Path) -> None:
    """Final loss against P from scratch, with the prefix control and the wider model marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    scratch = [r for r in summary["runs"] if r["group"] == "scratch"]
    # One line per seed: pooling the seeds into one sorted line would zig-zag between them.
    for seed in sorted({r.get("seed", 0) for r in scratch}):
        line = sorted((r["P"], r["val_loss"]) for r in scratch
                      if r["kind"] in ("p1", "streams") and r.get("seed", 0) == seed)
        if line:
            ax.plot(*zip(*line), "-", color="grey", lw=1, zorder=1)
    for r in scratch:
        color, marker = STYLE[r["kind"]]
        # each kind its own label: one shared by P = 1 and the streams kept only the last marker
        ax.scatter(r["P"], r["val_loss"], color=color, marker=marker, s=60, zorder=2, label=LEGEND[r["kind"]])
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one entry per kind
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4], ["1", "2", "4"])
    ax.set_xlabel("P (parallel streams)")
    ax.set_ylabel("final held-out loss (nats/token)")
    ax.set_title("final loss against P, same tokens and initialisation")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def _scatter(summary: dict[str, Any], path: Path, key: str, xlabel: str, title: str, log: bool = False) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in _main_runs(summary):
        if r.get(key) is None:
            continue
        color, marker = STYLE[r["kind"]]
        ax.scatter(r[key], r["val_loss"], marker=marker, s=50, edgecolors=color,
                   facecolors="none" if r["source"] else color)
        ax.annotate(r["name"], (r[key], r["val_loss"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final held-out loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def plot_comparisons(summary: dict[str, Any], path: Path) -> bool:
    """Every paired comparison over seeds as its mean with a bar of ± 2 standard errors: a bar
    that crosses zero is no evidence either way. False (nothing drawn) with one seed."""
    rows = [c for c in summary.get("comparisons", []) if c.get("se") is not None]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.4))
    ys = list(range(len(rows)))[::-1]  # the first comparison on top
    means = [c["mean"] for c in rows]
    ax.hlines(ys, [m - 2 * c["se"] for m, c in zip(means, rows)], [m + 2 * c["se"] for m, c in zip(means, rows)],
              color=["tab:red" if c["beyond_2se"] else "grey" for c in rows], lw=2)
    ax.plot(means, ys, "o", color="black", ms=4)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(ys, [f"{c['a']} − {c['b']}" for c in rows], fontsize=7)
    n = max(len(c["seeds"]) for c in rows)
    ax.set_xlabel(f"mean paired Δ loss, nats/token (bars ± 2 SE, {n} seeds; red: beyond)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    return True


def plot_loss_vs_n(summary: dict[str, Any], path: Path) -> None:
    """The `law` budget: final loss against the backbone's N, one colour per P (every seed a
    point, the means over seeds joined), the prefix controls dashed and the wider model marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    law = [r for r in summary["runs"] if r["group"] == "law"]
    n_of = {r["preset"]: r["non_embedding_params"] for r in law if r["kind"] in ("p1", "wide")}
    arms = {}  # (kind, P, prefix tokens) -> {N: [losses over seeds]}
    for r in law:
        if r["preset"] in n_of:
            key = (r["kind"], r["P"], r.get("prefix_tokens", 48) if r["kind"] == "prefix" else 0)
            arms.setdefault(key, {}).setdefault(n_of[r["preset"]], []).append(r["val_loss"])
    colours = {1: "tab:blue", 2: "tab:orange", 4: "tab:red", 8: "tab:brown"}
    for (kind, p, prefix), points in sorted(arms.items()):
        colour, marker = (colours.get(p, "black"), "o") if kind in ("p1", "streams") else STYLE[kind]
        if kind == "prefix" and prefix != 48:
            colour, marker = "tab:olive", "v"
        label = {"p1": "P=1", "streams": f"P={p}", "prefix": f"P=1 + one {prefix}-token prefix",
                 "wide": "P=1 wider (1.27x params)"}[kind]
        ns = sorted(points)
        for n in ns:
            ax.scatter([n] * len(points[n]), points[n], color=colour, marker=marker, s=14, alpha=0.4)
        means = [sum(points[n]) / len(points[n]) for n in ns]
        ax.plot(ns, means, "-" if kind in ("p1", "streams") else "--", color=colour, marker=marker, ms=7, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("N: non-embedding parameters of the backbone")
    ax.set_ylabel("final held-out loss (nats/token)")
    ax.set_title("loss against N, per P (points: seeds; line: their mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def write_plots(summary: dict[str, Any], out: Path) -> None:
    if summary.get("budget") in LAW_DESIGNS:  # its own design: loss against N; curves of the first seed only
        first = summary["config"]["seeds"][0]
        plot_curves({"runs": [r for r in summary["runs"] if r["seed"] == first]}, out / "curves.png")
        plot_loss_vs_n(summary, out / "loss_vs_n.png")
        plot_comparisons(summary, out / "comparisons.png")
        return
    plot_curves(summary, out / "curves.png")
    plot_loss_vs_p(summary, out / "loss_vs_p.png")
    _scatter(summary, out / "loss_vs_latency.png", "decode_ms_per_token",
             "decode ms/token, batch 1, float32 (fastest step)", "loss against decode latency (hollow: two-stage)")
    _scatter(summary, out / "loss_vs_flops.png", "total_flops", "training FLOPs (two-stage: both stages)",
             "loss against training compute (hollow: two-stage)", log=True)
    plot_comparisons(summary, out / "comparisons.png")
