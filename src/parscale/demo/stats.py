"""The statistics over seeds: paired differences between settings, their standard errors,
and the per-setting table.

Pure functions of the runs' numbers (no torch, no files), so `study` computes them and
`report` formats them without either importing the other.
"""
from __future__ import annotations

import math
from typing import Any

from parscale.demo.plan import PENALTIES, PREFIX_ATTEMPTS

# Seed-to-seed standard deviation of a paired loss difference between two settings, measured at
# this size before the demo existed (three seeds, P=2 minus the prefix control): one seed's
# gap smaller than about twice this is not evidence either way.
SEED_NOISE = 0.045


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def paired(runs: list[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """Setting `a` minus setting `b`, paired by seed: mean, standard error (sample sd / sqrt(n)),
    and whether |mean| lies beyond two standard errors (nothing is called a gain otherwise).
    One paired seed has no standard error (`se` None), so it is never beyond; None without
    a common seed."""
    la = {r["seed"]: r["val_loss"] for r in runs if r["setting"] == a}
    lb = {r["seed"]: r["val_loss"] for r in runs if r["setting"] == b}
    seeds = sorted(set(la) & set(lb))
    if not seeds:
        return None
    diffs = [la[s] - lb[s] for s in seeds]
    mean, se = _mean_se(diffs)
    return {"a": a, "b": b, "seeds": seeds, "diffs": diffs, "mean": mean, "se": se,
            "beyond_2se": se is not None and abs(mean) > 2 * se}


def settings_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting: mean held-out loss and its standard error over seeds, and the mean stream
    diagnostics (None at P = 1, where there is one stream)."""
    out = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        mine = [r for r in runs if r["setting"] == setting]
        mean, se = _mean_se([r["val_loss"] for r in mine])
        row = {"setting": setting, "n": len(mine), "mean": mean, "se": se}
        for key in ("stream_cosine", "top_weight", "weight_entropy"):
            vals = [r["streams"][key] for r in mine if r.get("streams") and r["streams"].get(key) is not None]
            row[key] = sum(vals) / len(vals) if vals else None
        out.append(row)
    return out


def comparisons(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pairs = [("p2", "p1"), ("p4", "p1"), ("p1-prefix", "p1"), ("p1-wide", "p1"), ("p2", "p1-prefix"),
             ("p4", "p1-prefix"), ("p2", "p1-wide"), ("post-p2-streams", "post-p1-control"),
             ("post-p4-streams", "post-p1-control"), ("p2-smooth0.1", "p2"), ("p2-smooth0.1", "p1-prefix"),
             ("p4-smooth0.1", "p4"), ("p4-smooth0.1", "p1-prefix"), ("p1-2x", "p1"), ("p1-prefix-2x", "p1-prefix"),
             ("p2-2x", "p2"), ("p2-2x", "p1-prefix-2x")]
    for name, _, _ in PREFIX_ATTEMPTS:  # each prefix attempt: against its own control, and against plain P=2
        pairs += [(f"p2-{name}", f"p1-prefix-{name}"), (f"p2-{name}", "p2")]
    pairs += [(f"p2-penalty{c:g}", "p1-prefix") for c in PENALTIES] + [(f"p2-penalty{c:g}", "p2") for c in PENALTIES]
    for size in dict.fromkeys(r["preset"] for r in runs if r["group"] == "size"):  # streams at the other sizes
        pairs += [(f"{size}-p2", f"{size}-p1"), (f"{size}-p4", f"{size}-p1")]
    return [c for c in (paired(runs, a, b) for a, b in pairs) if c is not None]
