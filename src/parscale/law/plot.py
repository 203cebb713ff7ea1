"""The fit as a picture: loss against N (log axis), one series and fitted curve per P."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from parscale.law.fitting import FitResult
from parscale.atomic import atomic_save_figure


def equation(res: FitResult) -> str:
    """The fitted law as mathtext for a legend or title."""
    return (rf"$L = {res.E:.4f} + \left(\frac{{{res.A:.4g}\cdot 10^9}}"
            rf"{{N\,({res.k:.4f}\,\ln P + 1)}}\right)^{{{res.alpha:.4f}}}$")


def plot_fit(res: FitResult, path: str | Path, *, title: str = "", held_out: dict | None = None) -> Path:
    """Draw the points, the fitted curve per P and (optionally) held-out points.

    `held_out` is the dict of `law.extrapolation_check` (keys params, P, loss, predicted):
    the held-out points are circled and their out-of-sample predictions drawn as crosses.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=130)
    all_n = res.params if held_out is None else np.concatenate([res.params, held_out["params"]])
    all_p = res.streams if held_out is None else np.concatenate([res.streams, held_out["P"]])
    streams = np.unique(all_p)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(streams)))
    grid = np.geomspace(all_n.min() / 1.15, all_n.max() * 1.15, 200)
    for p, color in zip(streams, colors):
        sel = res.streams == p
        ax.plot(grid, res.predict(grid, p), color=color, lw=1.4)
        ax.scatter(res.params[sel], res.loss[sel], color=color, s=22, zorder=3, label=f"P = {p:g}")
        if held_out is not None:
            hp = np.asarray(held_out["P"]) == p
            ax.scatter(np.asarray(held_out["params"])[hp], np.asarray(held_out["loss"])[hp],
                       color=color, s=22, zorder=3)
    if held_out is not None:
        ax.scatter(held_out["params"], held_out["loss"], s=110, facecolors="none",
                   edgecolors="crimson", lw=1.5, zorder=4, label="held out (extrapolation check)")
        ax.scatter(held_out["params"], held_out["predicted"], marker="x", color="crimson", s=40,
                   zorder=4, label="their prediction from a fit without them")
    ax.plot([], [], color="gray", lw=1.4, label=equation(res))
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("loss")
    ax.set_title(title or "parallel scaling law fit")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return atomic_save_figure(fig, path)
