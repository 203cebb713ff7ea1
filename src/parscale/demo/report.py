"""The demo's outputs: `summary.json` (every number), `report.md` (the readable study),
`losses.png` (every loss curve in one figure) and the key tables on stdout.

Pure formatting of the summary `parscale.demo.study.run_demo` gathers: nothing here trains,
fits or costs anything, so a report can be regenerated from `summary.json` alone.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from parscale.atomic import atomic_save_figure, atomic_write_text

# Seed-to-seed standard deviation of the paired (P=2 minus control) loss difference, measured
# on this tiny model and budget before the demo existed (three seeds): a single-seed gap
# smaller than this is not evidence either way.
SEED_NOISE = 0.05
CONVERSION_BOUND = 0.02  # the converted model's held-out loss within 2% of the P=1 model's


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _f(x: Any, fmt: str = ".4f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


# ---------------------------------------------------------------- tables
def runs_table(summary: dict[str, Any]) -> str:
    runs = summary["runs"]
    control = runs.get("p1-control", {}).get("final_val_loss")
    rows = []
    for name, r in runs.items():
        vs = "–" if name == "p1-pretrain" or control is None else f"{r['final_val_loss'] - control:+.4f}"
        change = "–" if r["step0_change"] is None else f"{100 * r['step0_change']:+.2f}%"
        rows.append([name, str(r["P"]), r["train"], f"{r['steps']:,}", f"{r['tokens']:,}",
                     _f(r["base_val_loss"]), _f(r["step0_val_loss"]), change,
                     f"**{r['final_val_loss']:.4f}**", vs, _minutes(r["train_seconds"])])
    return _table(["run", "P", "train", "steps", "tokens", "P=1 model", "step 0", "conversion",
                   "final", "vs control", "train time"], rows)


def backbone_table(summary: dict[str, Any]) -> str:
    b = summary["backbone"]
    rows = [[name, "yes" if r["identical"] else "no", f"{r['max_abs_diff']:.3g}"] for name, r in b["runs"].items()]
    return _table(["run", f"backbone identical to p1-pretrain ({b['tensors']} tensors)", "max abs diff"], rows)


def generations_table(summary: dict[str, Any]) -> str:
    rows = []
    for name, r in summary["runs"].items():
        text = r["completion"].replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎").replace("`", "'")
        rows.append([name, f"`{text}`" if text.strip() else "(empty)"])
    return _table(["run", f"greedy completion of `{summary['config']['prompt']}` (⏎ = newline)"], rows)


def law_table(summary: dict[str, Any]) -> str:
    law = summary["law"]
    params = _table(["E", "A (x1e9)", "alpha", "k", "R²", "max abs error", "converged"],
                    [[f"{law['E']:.4f}", f"{law['A']:.4g}", f"{law['alpha']:.4f}", f"{law['k']:.4f}",
                      f"{law['r2']:.5f}", f"{100 * law['max_abs_error']:.2f}%", "yes" if law["converged"] else "no"]])
    mult = _table(["P", "k·ln P + 1"], [[p, f"{m:.3f}"] for p, m in law["multipliers"].items()])
    return params + "\n\n" + mult


def cost_table(summary: dict[str, Any]) -> str:
    rows = []
    for r in summary["cost"]["rows"]:
        rows.append([str(r["P"]), str(r["batch_size"]), f"{r['loss_parscale']:.4f}",
                     f"{r['params_equivalent'] / 1e9:.2f}B",
                     f"{r['memory_increase_parscale_gib']:.3f}", f"{r['memory_increase_param_gib']:.3f}",
                     f"{1e3 * r['latency_increase_parscale_s']:.1f}", f"{1e3 * r['latency_increase_param_s']:.1f}",
                     f"{r['memory_ratio']:.1f}x", f"{r['latency_ratio']:.1f}x"])
    return _table(["P", "batch", "loss", "N equiv", "+mem streams GiB", "+mem params GiB", "+lat streams ms",
                   "+lat params ms", "memory ratio", "latency ratio"], rows)


def measured_table(summary: dict[str, Any]) -> str:
    m = summary["cost"].get("measured")
    if not m:
        return "(not measured: `--no-measure` was given)"
    rows = [[str(r["P"]), str(r["batch_size"]), f"{r['measured_memory_bytes'] / 2**20:.2f}",
             f"{r['predicted_memory_bytes'] / 2**20:.2f}", f"{1e3 * r['measured_decode_step_min_s']:.2f}",
             f"{1e3 * r['predicted_decode_step_s']:.2f}"] for r in m["rows"]]
    return _table(["P", "batch", "memory MiB (measured)", "memory MiB (predicted)", "decode step ms (measured)",
                   "decode step ms (predicted)"], rows)


# ---------------------------------------------------------------- interpretation
def _conversion(runs: dict[str, Any]) -> list[str]:
    changes = [r["step0_change"] for r in runs.values() if r["step0_change"] is not None and r["P"] > 1]
    if not changes:
        return []
    worst = max(changes, key=abs)
    verdict = "within" if abs(worst) <= CONVERSION_BOUND else "OUTSIDE"
    out = [f"Converting the P=1 model to P streams changed the held-out loss by at most {100 * worst:+.2f}% "
           f"before any training ({verdict} the 2% bound)."]
    stage1 = runs["p1-pretrain"]["final_val_loss"]
    again = [r["base_val_loss"] for r in runs.values() if r["base_val_loss"] is not None]
    if any(abs(b - stage1) > 1e-4 for b in again):  # same model, same text: only the tokenisation can differ
        out.append(f"WARNING: stage 2 measured the stage-1 model at {again[0]:.4f}, not its own {stage1:.4f}: "
                   "the two stages did not tokenise the held-out text alike.")
    return out


def _like_for_like(runs: dict[str, Any]) -> list[str]:
    """P=2 against the control when both train every weight on the same tokens: the fair test of streams."""
    if "p2-full" not in runs:
        return []
    full, control = runs["p2-full"], runs["p1-control"]
    gap = full["final_val_loss"] - control["final_val_loss"]
    size = "within" if abs(gap) < SEED_NOISE else "larger than"
    cost = full["train_seconds"] / max(control["train_seconds"], 1e-9)
    return [f"Like for like (every weight trains, the same tokens), P=2 ended {gap:+.4f} nats from the P=1 "
            f"control: {size} the ~{SEED_NOISE} seed-to-seed spread measured at this scale, from one seed. "
            f"It took {cost:.1f}x the control's training time: at matched compute the control would train "
            f"{cost:.1f}x as long."]


def _frozen(runs: dict[str, Any]) -> list[str]:
    start = runs["p1-control"]["base_val_loss"]
    names = [n for n in ("p2-streams", "p4-streams") if n in runs]
    if start is None or not names:
        return []
    moved = ", ".join(f"{n} {runs[n]['final_val_loss'] - start:+.4f}" for n in names)
    below = [n for n in names if runs[n]["final_val_loss"] < start]
    verdict = {len(names): "all below the stage-1 model: the streams more than won back the conversion cost",
               0: "still above the stage-1 model: the frozen runs have not yet won back the conversion cost"}.get(
        len(below), f"only {', '.join(below)} below the stage-1 model")
    share = ", ".join(f"{100 * runs[n]['stream_params'] / runs[n]['params']:.1f}% in {n}" for n in names)
    return [f"With the backbone frozen, only the prefixes and the aggregation learn ({share}). Change "
            f"from the stage-1 model ({start:.4f}): {moved} nats, {verdict}. The control, training all its "
            f"weights on the same tokens, moved {runs['p1-control']['final_val_loss'] - start:+.4f}. The paper's "
            "gains were measured at 0.5-4.4B parameters and billions of tokens, far beyond this model and budget."]


def findings(summary: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers, each with its caveat; nothing is claimed beyond them."""
    runs = summary["runs"]
    out = _conversion(runs) + _like_for_like(runs) + _frozen(runs)
    if summary["backbone"]["streams_share_backbone"]:
        out.append("The frozen-backbone models hold the stage-1 backbone bit for bit, so one backbone serves "
                   "every stream set: P can be chosen at load time (dynamic P).")
    else:
        out.append("WARNING: a frozen-backbone model's backbone differs from the stage-1 model's.")
    law = summary["law"]
    out.append(f"The law fitted to the paper's runs gives k = {law['k']:.3f}: P = 8 acts like "
               f"{law['multipliers']['8']:.2f}x the parameters. That is a statement about the paper's "
               "models, not a prediction for this tiny one.")
    return out


def report_markdown(summary: dict[str, Any]) -> str:
    cfg = summary["config"]
    b1 = [r for r in summary["cost"]["rows"] if r["batch_size"] == 1]
    headline = "; ".join(f"P={r['P']}: {r['memory_ratio']:.1f}x less memory increase, "
                         f"{r['latency_ratio']:.1f}x less latency increase" for r in b1)
    total = sum(r["train_seconds"] for r in summary["runs"].values())
    parts = [
        "# ParScale mini-study",
        f"The `tiny` preset on the Python standard library, seed {cfg['seed']}: stage 1 pretrains P=1 for "
        f"{cfg['pretrain_steps']} steps, stage 2 post-trains it four ways for {cfg['post_steps']} steps each. "
        f"Held-out losses (nats/token) are on the first {cfg['eval_tokens']:,} validation tokens. "
        f"Training time (sum of update steps, no evaluation): {_minutes(total)}.",
        "## Losses\n\n" + runs_table(summary),
        "`step 0` is the converted model before any update, `conversion` its change against the P=1 model. "
        "`vs control` is the final loss minus the P=1 control's (negative: better).",
        "![loss curves](losses.png)",
        "## One backbone, several stream sets\n\n" + backbone_table(summary),
        "## Generations\n\n" + generations_table(summary),
        f"## The parallel scaling law ({summary['law']['data']}, {summary['law']['points']} runs)\n\n"
        "L(N, P) = E + (A·1e9 / (N·(k·ln P + 1)))^α\n\n" + law_table(summary),
        "![law fit](law_fit.png)",
        f"## Inference cost: streams against parameters of equal loss ({summary['cost']['model']}, "
        f"{summary['cost']['hardware']}, {summary['cost']['reference']})\n\n" + cost_table(summary),
        f"At batch 1: {headline}. The paper reports about 22x and 6x for P=8.",
        "![cost comparison](cost_compare.png)",
        "### The tiny model on this CPU\n\n" + measured_table(summary),
        "## What this shows, and what it does not\n\n" + "\n".join(f"- {s}" for s in findings(summary)),
    ]
    return "\n\n".join(parts) + "\n"


def print_tables(summary: dict[str, Any]) -> None:
    """The key tables on stdout (the CLI's closing output)."""
    print("\n" + runs_table(summary) + "\n\n" + backbone_table(summary) + "\n\n" + generations_table(summary))
    print("\n" + law_table(summary) + "\n\n" + cost_table(summary) + "\n\n" + measured_table(summary))
    print("\n" + "\n".join(f"- {s}" for s in findings(summary)), flush=True)


# ---------------------------------------------------------------- files
def plot_losses(summary: dict[str, Any], path: Path) -> None:
    """Stage 1 (left) and every stage-2 run (right, validation with step 0) in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    pre = runs["p1-pretrain"]
    left.plot(*zip(*pre["train_curve"]), lw=0.7, alpha=0.5, label="train")
    left.plot(*zip(*pre["val_curve"]), "o-", label="validation")
    left.set_title("stage 1: P=1 from scratch")
    for name, r in runs.items():
        if name != "p1-pretrain":
            right.plot(*zip(*r["val_curve"]), "o-", label=f"{name} ({r['final_val_loss']:.3f})")
    if pre["val_curve"]:
        right.axhline(pre["final_val_loss"], color="grey", ls="--", lw=1, label="stage-1 model")
    right.set_title("stage 2: validation loss from the stage-1 model")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def write_text(path: Path, text: str) -> None:
    """Atomically, then readable by others like any output (the temp file was private)."""
    atomic_write_text(path, text)
    os.chmod(path, 0o644)


def write_report(summary: dict[str, Any], out: Path) -> None:
    """summary.json, losses.png and report.md in `out`, each written atomically."""
    out = Path(out)
    write_text(out / "summary.json", json.dumps(summary, indent=1, default=float) + "\n")
    plot_losses(summary, out / "losses.png")
    write_text(out / "report.md", report_markdown(summary))
