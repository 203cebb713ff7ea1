"""The demo's outputs: `summary.json` (every number), `report.md` (the readable study), four
plots of our runs, and the key tables on stdout.

Pure formatting of the summary `parscale.demo.study.run_demo` gathers: nothing here trains,
fits or measures, so a report can be regenerated from `summary.json` alone.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from parscale.atomic import atomic_write_text
from parscale.cost.compare import against_parameters
from parscale.demo.stats import SEED_NOISE

PLOTS = ("curves.png", "loss_vs_p.png", "loss_vs_latency.png", "loss_vs_flops.png")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _f(x: Any, fmt: str = "+.4f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _si(x: float | None) -> str:
    if x is None:
        return "–"
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _by(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in summary["runs"]}


# ---------------------------------------------------------------- tables
def runs_table(summary: dict[str, Any]) -> str:
    rows = []
    for r in summary["runs"]:
        s = r["streams"] or {}
        rows.append([r["name"], r["label"], str(r["P"]), f"**{r['val_loss']:.4f}**", _f(r["delta_vs_p1"]),
                     _f(r["delta_vs_control"]), f"{r['train_seconds']:.0f} s", _si(r["train_flops"]),
                     _si(r["non_embedding_params"]), _si(r["extra_params"]), _f(r["decode_ms_per_token"], ".2f"),
                     _f(r["decode_ms_per_token_bf16"], ".2f"), _f(s.get("stream_cosine"), ".3f"),
                     _f(s.get("top_weight"), ".2f"), _f(s.get("weight_entropy"), ".2f")])
    return _table(["run", "what", "P", "val loss", "Δ vs P=1", "Δ vs control", "train time", "train FLOPs",
                   "non-emb params", "extra params", "decode ms/tok fp32", "bf16", "stream cos", "top weight",
                   "weight entropy"], rows)


def init_table(summary: dict[str, Any]) -> str:
    rows = [[r["name"], r["init_backbone_sha256"][:12]] for r in summary["runs"] if r["init_backbone_sha256"]]
    return _table(["from-scratch run", "initial backbone (sha256)"], rows)


def backbone_table(summary: dict[str, Any]) -> str:
    rows = [[r["name"], r["source"], "yes" if r["backbone_vs_source"]["identical"] else "**no**",
             f"{r['backbone_vs_source']['max_abs_diff']:.3g}"] for r in summary["runs"] if r.get("backbone_vs_source")]
    return _table(["frozen-backbone run", "source", "backbone bit-identical to the source", "max abs diff"], rows)


def seeds_table(summary: dict[str, Any]) -> str:
    rows = [[s["setting"], str(s["n"]), f"{s['mean']:.4f}", _f(s["se"], ".4f"), _f(s.get("stream_cosine"), ".3f"),
             _f(s.get("top_weight"), ".2f"), _f(s.get("weight_entropy"), ".2f")] for s in summary["settings"]]
    table = _table(["setting", "seeds", "mean val loss", "standard error", "stream cos", "top weight",
                    "weight entropy"], rows)
    rows = [[f"{c['a']} − {c['b']}", str(len(c["seeds"])), f"{c['mean']:+.4f}", _f(c["se"], ".4f"),
             "yes" if c["beyond_2se"] else "no"] for c in summary["comparisons"]]
    return table + "\n\n" + _table(["paired by seed", "seeds", "mean Δ", "standard error", "beyond 2 SE"], rows)


def law_table(law: dict[str, Any]) -> str:
    params = _table(["E", "A (x1e9)", "alpha", "k", "R²", "max abs error"],
                    [[f"{law['E']:.4f}", f"{law['A']:.4g}", f"{law['alpha']:.4f}", f"{law['k']:.4f}",
                      f"{law['r2']:.5f}", f"{100 * law['max_abs_error']:.2f}%"]])
    mult = _table(["P", "k·ln P + 1"], [[p, f"{m:.3f}"] for p, m in law["multipliers"].items()])
    return params + "\n\n" + mult


def own_law_table(law: dict[str, Any]) -> str:
    if law.get("k") is None:
        return f"Not identifiable from these runs: {law['reason']}"
    return _table(["E", "A (x1e9)", "alpha", "k", "k 95% bootstrap", "R²", "points", "converged", "identifiable"],
                  [[f"{law['E']:.4f}", f"{law['A']:.4g}", f"{law['alpha']:.4f}", f"{law['k']:.4f}",
                    f"{law['k_ci'][0]:.2f}–{law['k_ci'][1]:.2f}", f"{law['r2']:.4f}", str(law["points"]),
                    "yes" if law["converged"] else "no", "yes" if law["identifiable"] else "no"]])


def cost_table(cost: dict[str, Any]) -> str:
    rows = [[str(r["P"]), str(r["batch_size"]), f"{r['params_equivalent'] / 1e9:.2f}B",
             f"{r['memory_increase_parscale_gib']:.3f}", f"{r['memory_increase_param_gib']:.3f}",
             f"{1e3 * r['latency_increase_parscale_s']:.1f}", f"{1e3 * r['latency_increase_param_s']:.1f}",
             f"{r['memory_ratio']:.1f}x", f"{r['latency_ratio']:.1f}x"] for r in cost["rows"]]
    return _table(["P", "batch", "N equiv", "+mem streams GiB", "+mem params GiB", "+lat streams ms",
                   "+lat params ms", "memory ratio", "latency ratio"], rows)


def took(summary: dict[str, Any]) -> str:
    """How long the demo took. A study run in pieces reuses the runs finished earlier, so its
    last invocation's wall time says little: the runs' own training times are summed beside it."""
    wall = summary["wall_seconds"] / 60
    reused = (summary.get("parallel") or {}).get("reused") or 0
    if not reused:
        return f"the whole demo took {wall:.1f} min"
    trained = sum(r.get("train_seconds") or 0.0 for r in summary["runs"]) / 60
    return (f"this invocation took {wall:.1f} min and reused {reused} of the {len(summary['runs'])} runs, finished "
            f"by an earlier one; the training of all runs sums to {trained:.0f} min")


def parallel_line(summary: dict[str, Any]) -> str:
    p = summary["parallel"]
    if p.get("workers", 1) < 2:
        return "Runs went one at a time (`--workers 1`)."
    check = (f"Two identical {p['steps']}-step training jobs took {p['sequential_s']:.1f} s one after the other "
             f"and {p['parallel_s']:.1f} s two at a time: **{p['speedup']:.2f}x** the throughput.")
    reused = p.get("reused", 0)
    if reused:  # a reused run took no time now: the wall clock of this invocation says nothing about training
        return (f"{check} {reused} of {p.get('runs', reused)} runs were reused from an earlier `parscale demo` "
                "in this directory, so this invocation's wall time is not a training time; the table's train "
                "times are each run's own.")
    return (f"{check} The runs themselves took {p['runs_wall_s'] / 60:.1f} min of wall time, against "
            f"{p['runs_sum_s'] / 60:.1f} min summed over runs (each slowed somewhat by its neighbour).")


# ---------------------------------------------------------------- the reading
def findings(summary: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers, each with its caveat; nothing beyond them."""
    by, out = _by(summary), []
    n_seeds = len(summary["config"]["seeds"])
    noise = (f" One seed: a paired gap needs to exceed about {2 * SEED_NOISE:.2f} nats (twice the "
             f"{SEED_NOISE} seed-to-seed spread measured earlier at this size) to mean anything.") if n_seeds == 1 else ""
    p1 = by.get("p1")
    if p1 and "p2" in by and "p1-prefix" in by:
        d2, d4 = by["p2"]["delta_vs_p1"], by.get("p4", {}).get("delta_vs_p1")
        dp = by["p1-prefix"]["delta_vs_p1"]
        out.append(f"From scratch on the same tokens, P=2 ended {d2:+.4f} nats from P=1"
                   + (f" and P=4 {d4:+.4f}" if d4 is not None else "")
                   + f"; one 48-token prefix at P=1 alone gave {dp:+.4f}. P=2 against the prefix control: "
                   f"{d2 - dp:+.4f}." + noise)
    if p1 and "p1-wide" in by and "p2" in by:
        w = by["p1-wide"]
        out.append(f"The wider P=1 model ({w['non_embedding_params'] / p1['non_embedding_params']:.2f}x the "
                   f"non-embedding parameters) ended {w['delta_vs_p1']:+.4f} from P=1; P=2 minus wide: "
                   f"{by['p2']['val_loss'] - w['val_loss']:+.4f}.")
    if p1 and "p2" in by and p1["decode_ms_per_token"]:
        r = lambda k, n: by[n][k] / p1[k]  # noqa: E731
        out.append(f"What P=2 costs here: {r('train_seconds', 'p2'):.2f}x the training time, "
                   f"{r('train_flops', 'p2'):.2f}x the training FLOPs and {r('decode_ms_per_token', 'p2'):.2f}x "
                   f"(float32) / {r('decode_ms_per_token_bf16', 'p2'):.2f}x (bfloat16) the decode time per token at "
                   f"batch 1; P=4 {r('train_flops', 'p4'):.2f}x the FLOPs, {r('decode_ms_per_token', 'p4'):.2f}x the "
                   "float32 decode time. The tiny model's decode step is dominated by per-layer overheads, "
                   "not by reading weights, so these latency ratios say little about large models.")
    streams = [r for r in summary["runs"] if r["streams"]]
    if streams:
        cos = [r["streams"]["stream_cosine"] for r in streams]
        top = [r["streams"]["top_weight"] for r in streams]
        ent = [r["streams"].get("weight_entropy") for r in streams if r["streams"].get("weight_entropy") is not None]
        out.append(f"How alike the streams are: their final hidden states have cosine {min(cos):.3f}–{max(cos):.3f}, "
                   f"and the aggregation gives its favourite stream {min(top):.2f}–{max(top):.2f} of the weight"
                   + (f" (entropy {min(ent):.2f}–{max(ent):.2f} of log P; 1 would be uniform)." if ent else "."))
    post = [r for r in summary["runs"] if r["group"] == "two-stage" and r["train"] == "streams"]
    if post:
        gaps = ", ".join(f"{r['name']} {r['delta_vs_control']:+.4f}" for r in post if r["delta_vs_control"] is not None)
        same = all(r["backbone_vs_source"]["identical"] for r in post)
        out.append(f"Two-stage, against the P=1 control trained on the same tokens: {gaps}. The frozen-backbone "
                   f"models {'hold' if same else 'do NOT hold'} the P=1 backbone bit for bit, so one backbone "
                   "serves every stream set (P chosen at load time).")
    for c in summary["comparisons"] if n_seeds > 1 else []:
        verdict = "beyond" if c["beyond_2se"] else "within"
        out.append(f"{c['a']} − {c['b']} over {len(c['seeds'])} paired seeds: {c['mean']:+.4f} ± {c['se']:.4f} "
                   f"(SE), {verdict} two standard errors.")
    law = summary.get("own_law")
    if law:
        out.append(f"Our own law fit: k = {law['k']:.3f} (95% bootstrap {law['k_ci'][0]:.2f}–{law['k_ci'][1]:.2f}) "
                   f"against the paper's 0.39 on code." if law.get("k") is not None else
                   f"The law is not identifiable from our runs: {law['reason']}")
        if law.get("k") is not None and not law["identifiable"]:
            out.append("That interval is too wide to identify k at this scale.")
    out.append(f"The paper's law (fitted to its own 24 runs) gives k = {summary['paper_law']['k']:.3f}: that is "
               "a statement about 0.5–4.4B models trained on billions of tokens, not a prediction for these "
               "sub-million-parameter models trained on well under a million tokens.")
    return out


def report_markdown(summary: dict[str, Any]) -> str:
    cfg, m = summary["config"], summary["machine"]
    cpu = (m["start"].get("cpu") or "unknown CPU") + (f" ({m['start']['flags']})" if m["start"].get("flags") else "")
    b1 = [r for r in summary["paper_cost"]["rows"] if r["batch_size"] == 1]
    headline = "; ".join(
        f"P={r['P']}: " + against_parameters(r["memory_increase_param_gib"], r["memory_increase_parscale_gib"],
                                             "memory increase")
        + ", " + against_parameters(r["latency_increase_param_s"], r["latency_increase_parscale_s"], "latency increase")
        for r in b1)
    parts = [
        f"# ParScale mini-study (`--budget {summary['budget']}`)",
        f"The `tiny` preset (d=128, 4 layers) on the Python standard library; seeds {list(cfg['seeds'])}. "
        f"From-scratch runs take {cfg['steps']} updates of {cfg.get('batch_size', 8)} x 128 tokens, two-stage runs {cfg['post_steps']} "
        f"more. Every loss is on the same first {cfg['eval_tokens']:,} held-out tokens (nats/token). Times are "
        f"from {cpu}, {m['start']['cores']} cores, load average {m['start']['load_average'][0]:.1f} at the start and "
        f"{m['end']['load_average'][0]:.1f} at the end (other jobs share the machine, so times are inflated); "
        f"{took(summary)}.",
        "## Runs\n\n" + runs_table(summary),
        "`Δ vs P=1`: final loss minus the P=1 run of the same seed and size (negative is better). `Δ vs "
        "control`: two-stage runs against `post-p1-control`. `train time`: the update steps only. `extra "
        "params`: non-embedding parameters beyond the P=1 baseline. Decode: the fastest of the timed steps "
        "at batch 1, one thread (`parscale.cost.measure`). `stream cos`, `top weight` and `weight entropy` "
        "(P > 1 only): the mean pairwise cosine of the streams' final hidden states, and the aggregation's "
        "mean largest weight and mean entropy over log P (1: uniform, 0: one stream), on held-out text.",
        "![validation curves](curves.png)\n\n![final loss against P](loss_vs_p.png)",
        "![loss against decode latency](loss_vs_latency.png)\n\n![loss against training FLOPs](loss_vs_flops.png)",
        "## Shared initialisation and one backbone for every stream set\n\n" + init_table(summary)
        + "\n\nRuns of one seed and size start from the same backbone (the stream parameters draw from their "
        "own generator); the wider model cannot.\n\n" + backbone_table(summary),
        "## Two runs at a time\n\n" + parallel_line(summary),
    ]
    if len(cfg["seeds"]) > 1:
        parts.append("## Over seeds\n\n" + seeds_table(summary) + "\n\n![paired comparisons](comparisons.png)")
    own = summary.get("own_law")
    if own:
        parts.append("## The law fitted to our own runs\n\n"
                     "From-scratch P = 1, 2, 4 runs at three sizes, every seed a point; N is the backbone's "
                     "non-embedding parameter count. Identifiable means converged with k's 95% bootstrap "
                     "interval narrower than 1.\n\n" + own_law_table(own)
                     + ("\n\n![our law fit](own_law_fit.png)" if own.get("k") is not None else ""))
    law = summary["paper_law"]
    parts += [
        f"## The paper's data: the parallel scaling law ({law['data']}, {law['points']} runs)\n\n"
        "L(N, P) = E + (A·1e9 / (N·(k·ln P + 1)))^α, fitted to the paper's published losses, not to our runs.\n\n"
        + law_table(law) + "\n\n![law fit](law_fit.png)",
        f"## The paper's models: inference cost of streams against parameters of equal loss "
        f"({summary['paper_cost']['model']}, modelled on {summary['paper_cost']['hardware']})\n\n"
        + cost_table(summary["paper_cost"]) + f"\n\nAt batch 1: {headline}. The paper reports about 22x and 6x for "
        "P=8.\n\n![cost comparison](cost_compare.png)",
        "## What this shows, and what it does not\n\n" + "\n".join(f"- {s}" for s in findings(summary)),
    ]
    return "\n\n".join(parts) + "\n"


def print_tables(summary: dict[str, Any]) -> None:
    """The key tables on stdout (the CLI's closing output)."""
    print("\n" + runs_table(summary) + "\n\n" + parallel_line(summary))
    print("\n" + "\n".join(f"- {s}" for s in findings(summary)), flush=True)


# ---------------------------------------------------------------- files
def write_text(path: Path, text: str) -> None:
    """Atomically, then readable by others like any output (the temp file was private)."""
    atomic_write_text(path, text)
    os.chmod(path, 0o644)


def write_report(summary: dict[str, Any], out: Path, markdown=report_markdown) -> None:
    """summary.json, the plots and report.md (`markdown(summary)`) in `out`, each written atomically."""
    from parscale.demo.plots import write_plots

    out = Path(out)
    write_text(out / "summary.json", json.dumps(summary, indent=1, default=float) + "\n")
    write_plots(summary, out)
    write_text(out / "report.md", markdown(summary))
