"""The run's record: `metrics.jsonl` (one JSON object per line) and the `loss.png` curve."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from parscale.atomic import atomic_save_figure, atomic_write_text
from parscale.errors import has_module, missing_extra

log = logging.getLogger(__name__)
_SKIPPED_PLOT: list[bool] = []  # the skipped plot is said once per process, not at every evaluation


class MetricsLog:
    """Append-only JSONL metrics; on resume, lines past the checkpoint's step are dropped,
    so a resumed run's file reads exactly as an uninterrupted run's."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _parse(line) is not None and _parse(line)["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)


def _parse(line: str) -> dict[str, Any] | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a kill
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    return [r for r in map(_parse, Path(path).read_text().splitlines()) if r is not None]


def plot_losses(records: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Train loss per step and validation loss at each evaluation, written atomically.

    Without matplotlib (the `plot` extra) a run trains all the same: the plot is skipped, and
    said once per process. Returns whether the plot was written."""
    if not has_module("matplotlib"):
        if not _SKIPPED_PLOT:
            log.info("loss.png is not drawn: %s", missing_extra("matplotlib", "the loss plot"))
            _SKIPPED_PLOT.append(True)
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in records
             if r.get("train_loss") is not None and math.isfinite(r["train_loss"]) and r["step"] > 0]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.6, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.6, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    return True
