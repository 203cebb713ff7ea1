"""The statistics over seeds: paired differences between settings, their standard errors,
the per-setting table, and the `law` budget's premise check.

Pure functions of the runs' numbers (no torch, no files), so `study` computes them and
`report` formats them without either importing the other.
"""
from __future__ import annotations

import math
from typing import Any

from parscale.demo.plan import (LAW_ATTEMPTS, LAW_DESIGNS, LAW_P, LAW_PREFIXES, PENALTIES, PREFIX_ATTEMPTS,
                                LawDesign)

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
    for design in LAW_DESIGNS.values():  # a pair without its runs is left out below
        pairs += premise_pairs(design) + law_pairs(design)
    return [c for c in (paired(runs, a, b) for a, b in pairs) if c is not None]


# ---------------------------------------------------------------- the law budget
def premise_pairs(design: LawDesign = LAW_DESIGNS["law"]) -> list[tuple[str, str]]:
    """The premise of the law as paired comparisons: P = 1 at each size minus the size below it,
    then the wider model minus P = 1 of the size it widens. Each must be negative."""
    steps = [(f"{b}-p1", f"{a}-p1") for a, b in zip(design.sizes, design.sizes[1:])]
    return steps + [(design.wide, f"{design.widened}-p1")]


def law_pairs(design: LawDesign = LAW_DESIGNS["law"]) -> list[tuple[str, str]]:
    """At every size, each P > 1 against P = 1 and against both prefix controls; and P = 2 against
    the wider model (1.27x the parameters: what the paper's k = 0.39 says two streams are worth)."""
    pairs = [(f"{size}-p{p}", f"{size}-{base}") for size in design.sizes for p in LAW_P if p > 1
             for base in ["p1"] + [f"prefix{t}" for t in LAW_PREFIXES]] + [(f"{design.widened}-p2", design.wide)]
    # each stream-diversity attempt against plain P = 2 and both prefix controls of its size
    return pairs + [(f"{size}-p2-{name}", f"{size}-{base}") for size in design.sizes for name, _, _ in LAW_ATTEMPTS
                    for base in ["p2"] + [f"prefix{t}" for t in LAW_PREFIXES]]


def premise(runs: list[dict[str, Any]], design: LawDesign = LAW_DESIGNS["law"]) -> dict[str, Any]:
    """Whether these runs sit where the law can be tested: P = 1 loss falls with N between every
    two consecutive sizes, and the wider model beats P = 1, each beyond two standard errors of the
    paired difference. A regime where more parameters do not help cannot show whether streams
    act like more parameters. A comparison without runs (or with one seed, no SE) fails."""
    checks = []
    for a, b in premise_pairs(design):
        c = paired(runs, a, b) or {"a": a, "b": b, "seeds": [], "diffs": [], "mean": None, "se": None,
                                   "beyond_2se": False}
        checks.append({**c, "holds": bool(c["beyond_2se"] and c["mean"] < 0)})
    n_falls = all(c["holds"] for c in checks[:-1])
    wide_beats = checks[-1]["holds"]
    return {"holds": n_falls and wide_beats, "n_falls": n_falls, "wide_beats": wide_beats, "checks": checks}
