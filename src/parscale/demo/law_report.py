"""The `law` budget's report.md: the premise of the law first, and only where it holds, what
the streams buy at every size and the law fitted to our own runs.

The premise: at P = 1 the loss falls with N (between every two consecutive sizes) and the
1.27x wider model beats P = 1, each beyond two standard errors of the paired difference. Where
parameters do not help, nothing can be learned about whether streams act like parameters, so
a failed premise ends the reading: the comparisons stay in summary.json, not in the findings.
Pure formatting of the summary, like `report`, whose tables it reuses.
"""
from __future__ import annotations

from typing import Any

from parscale.demo.plan import LAW_ATTEMPTS, LAW_P, LAW_PREFIXES, law_design
from parscale.demo.report import _f, _si, _table, parallel_line, runs_table, took

PAPER_K = {"paper-stack": "Stack-V2-Python", "paper-pile": "the Pile"}


def _design(summary: dict[str, Any]):
    return law_design(summary.get("budget", "law"))


def _delta(c: dict[str, Any] | None) -> str:
    """'−0.123 ± 0.012 (yes)': mean paired Δ, its SE, beyond two SE or not."""
    if c is None or c.get("mean") is None:
        return "not run"
    if c["se"] is None:
        return f"{c['mean']:+.3f} (one seed)"
    return f"{c['mean']:+.3f} ± {c['se']:.3f} ({'yes' if c['beyond_2se'] else 'no'})"


def _cmp(summary: dict[str, Any], a: str, b: str) -> dict[str, Any] | None:
    return next((c for c in summary["comparisons"] if (c["a"], c["b"]) == (a, b)), None)


def _setting(summary: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((s for s in summary["settings"] if s["setting"] == name), None)


def setup(summary: dict[str, Any]) -> str:
    cfg, law, m = summary["config"], summary["law"], summary["machine"]
    sizes = ", ".join(f"`{p}` (N = {_si(n)}, {law['tokens_per_param'][p]:.3g} tokens per parameter)"
                      for p, n in law["N"].items())
    return (f"Every run trains from scratch on the same {law['tokens_per_run']:,} tokens ({cfg['steps']} updates of "
            f"{cfg['batch_size']} x 128) of the Python standard library, byte-level BPE of "
            f"{cfg['data']['vocab_size']} tokens: {law['epochs']:.2f} epochs of its {law['train_tokens']:,} training "
            f"tokens, so {'no sequence is seen twice' if law['epochs'] <= 1 else 'the data repeat'}. Sizes: {sizes}; "
            f"N is the backbone's non-embedding parameter count. Seeds {list(cfg['seeds'])}, paired: within a seed "
            "every run of a size starts from the same backbone and sees the same batches in the same order. Every "
            f"loss is on the same first {cfg['eval_tokens']:,} held-out tokens (nats/token); ± is one standard error "
            "of the mean paired difference over seeds, and (yes) marks a mean beyond two standard errors. Times are "
            f"from {m['start'].get('gpu') + ' beside ' if m['start'].get('gpu') else ''}"
            f"{m['start'].get('cpu') or 'an unknown CPU'}"
            f"{' (' + m['start']['flags'] + ')' if m['start'].get('flags') else ''}, {m['start']['cores']} cores, load average "
            f"{m['start']['load_average'][0]:.1f} at the start and {m['end']['load_average'][0]:.1f} at the end; "
            f"{took(summary)}.")


def premise_section(summary: dict[str, Any]) -> str:
    pre, design = summary["law"]["premise"], _design(summary)
    rows = [[f"{c['a']} − {c['b']}", str(len(c["seeds"])), _delta(c), "yes" if c["holds"] else "**no**"]
            for c in pre["checks"]]
    table = _table(["paired by seed", "seeds", "mean Δ ± SE", "negative beyond 2 SE"], rows)
    if pre["holds"]:
        verdict = ("**The premise holds.** At P = 1 the loss falls with N between every two consecutive sizes, "
                   f"and `{design.wide}` beats P = 1 of `{design.widened}`, each beyond two standard errors: these runs "
                   "sit where more parameters help, so what the streams buy can be asked here.")
    else:
        failed = [what for what, ok in (("P = 1 loss does not fall with N beyond two standard errors at every size "
                                         "step", pre["n_falls"]),
                                        (f"the wider model does not beat P = 1 beyond two standard errors",
                                         pre["wide_beats"])) if not ok]
        verdict = (f"**The premise fails**: {'; '.join(failed)}. **This study cannot test the law at this budget**, "
                   "so this report stops short of claims: the comparisons of the streams with P = 1 and with the "
                   "prefix controls, and the law fitted to these runs, are in summary.json but are not findings. "
                   "The losses below are the measurements.")
    return "## First: does the law's premise hold in these runs?\n\n" + table + "\n\n" + verdict


def losses_table(summary: dict[str, Any]) -> str:
    """Mean held-out loss ± SE over seeds, one row per size, and the streams' mean cosine."""
    def cell(name: str) -> str:
        s = _setting(summary, name)
        return "–" if s is None else f"{s['mean']:.4f} ± {_f(s['se'], '.4f')}"

    arms = [f"p{p}" for p in LAW_P] + [f"prefix{t}" for t in LAW_PREFIXES]
    rows, design = [], _design(summary)
    for size in design.sizes:
        cos = [s["stream_cosine"] for p in LAW_P if p > 1 and (s := _setting(summary, f"{size}-p{p}"))
               and s.get("stream_cosine") is not None]
        rows.append([f"`{size}`", _si(summary["law"]["N"].get(size))] + [cell(f"{size}-{a}") for a in arms]
                    + [", ".join(f"{c:.3f}" for c in cos) or "–"])
    header = ["size", "N"] + [f"P = {p}" for p in LAW_P] + [f"{t}-token prefix, P = 1" for t in LAW_PREFIXES]
    table = _table(header + ["stream cos (P = 2, 4)"], rows)
    wide = _setting(summary, design.wide)
    if wide:
        table += (f"\n\n`{design.wide}` (N = {_si(summary['law']['N'].get(design.wide))}, P = 1): "
                  f"{wide['mean']:.4f} ± {_f(wide['se'], '.4f')}.")
    return table


def streams_section(summary: dict[str, Any]) -> str:
    design = _design(summary)
    bases = ["p1"] + [f"prefix{t}" for t in LAW_PREFIXES]
    names = {"p1": "P = 1"} | {f"prefix{t}": f"{t}-token prefix" for t in LAW_PREFIXES}
    header = ["size"] + [f"P = {p} − {names[b]}" for p in LAW_P if p > 1 for b in bases]
    rows = [[f"`{size}`"] + [_delta(_cmp(summary, f"{size}-p{p}", f"{size}-{b}")) for p in LAW_P if p > 1
                             for b in bases] for size in design.sizes]
    wide = _cmp(summary, f"{design.widened}-p2", design.wide)
    text = ("## What the streams buy, at every size\n\nPaired by seed (mean Δ ± SE, negative: the streams are "
            "better); the 48-token control is one prefix of P = 2's length, the 96-token one holds as many prefix "
            "parameters as P = 2's two.\n\n" + _table(header, rows))
    if wide:
        text += (f"\n\nP = 2 of `{design.widened}` against its 1.27x wider P = 1 model (what the paper's k = 0.39 says "
                 f"two streams are worth): {_delta(wide)}.")
    return text


def attempts_section(summary: dict[str, Any]) -> str:
    """ND-LoRA's fixes for collapsed streams, at P = 2: against plain P = 2 and both prefix controls."""
    bases = ["p2"] + [f"prefix{t}" for t in LAW_PREFIXES]
    names = {"p2": "plain P = 2"} | {f"prefix{t}": f"{t}-token prefix" for t in LAW_PREFIXES}
    rows = []
    for size in _design(summary).sizes:
        for name, what, _ in LAW_ATTEMPTS:
            s = _setting(summary, f"{size}-p2-{name}")
            cos = f"{s['stream_cosine']:.3f}" if s and s.get("stream_cosine") is not None else "–"
            rows.append([f"`{size}`", what] + [_delta(_cmp(summary, f"{size}-p2-{name}", f"{size}-{b}")) for b in bases]
                        + [cos])
    header = ["size", "attempt"] + [f"− {names[b]}" for b in bases] + ["stream cos"]
    return ("## Attempts to make the streams differ (ND-LoRA, arXiv 2510.20690)\n\nEach at P = 2, paired by seed "
            "(mean Δ ± SE, negative: the attempt is better), with the streams' mean hidden-state cosine.\n\n"
            + _table(header, rows))


def law_section(summary: dict[str, Any]) -> str:
    own, paper = summary.get("own_law"), summary["law"]["paper_k"]
    against = " and ".join(f"{paper[k]:.2f} ({PAPER_K[k]})" for k in PAPER_K if k in paper)
    head = ("## The law fitted to our own runs\n\nL(N, P) = E + (A·1e9 / (N·(k·ln P + 1)))^α fitted to the "
            "from-scratch P = 1, 2, 4 runs of the three sizes, every seed a point (`parscale.law`, 200 bootstrap "
            f"resamples). The paper's k: {against}.\n\n")
    if not own or own.get("k") is None:
        return head + f"Not identifiable from these runs: {(own or {}).get('reason', 'fewer than three sizes')}."
    lo, hi = own["k_ci"]
    inside = ", ".join(f"{'contains' if lo <= paper[k] <= hi else 'excludes'} the paper's {paper[k]:.2f}"
                       for k in PAPER_K if k in paper)
    table = _table(["k", "k 95% bootstrap", "E", "A (x1e9)", "alpha", "R²", "points", "converged", "on a bound"],
                   [[f"{own['k']:.3f}", f"{lo:.2f}–{hi:.2f}", f"{own['E']:.4f}", f"{own['A']:.4g}",
                     f"{own['alpha']:.4f}", f"{own['r2']:.4f}", str(own["points"]), "yes" if own["converged"] else "no",
                     ", ".join(own.get("at_bound") or []) or "none"]])
    width = ("" if own["identifiable"] else " That interval is wider than 1 (or the fit did not converge): k is not "
             "identified at this budget.")
    return head + table + f"\n\nk's interval {inside}.{width}\n\n![our law fit](own_law_fit.png)"


def law_markdown(summary: dict[str, Any]) -> str:
    pre = summary["law"]["premise"]
    parts = [f"# ParScale law study (`--budget {summary.get('budget', 'law')}`)", setup(summary), premise_section(summary),
             "## Held-out loss, mean over seeds\n\n" + losses_table(summary)
             + "\n\n![loss against N, per P](loss_vs_n.png)"]
    if pre["holds"]:
        parts += [streams_section(summary), attempts_section(summary), law_section(summary),
                  "![every paired comparison with its ± 2 SE bar](comparisons.png)"]
    parts += ["## Runs\n\n" + runs_table(summary) + "\n\nValidation curves of the first seed:\n\n"
              "![validation curves](curves.png)", "## Two runs at a time\n\n" + parallel_line(summary)]
    return "\n\n".join(parts) + "\n"


def print_law(summary: dict[str, Any]) -> None:
    """The premise and, where it holds, the streams' table on stdout (the CLI's closing output)."""
    print("\n" + premise_section(summary) + "\n\n" + losses_table(summary), flush=True)
    if summary["law"]["premise"]["holds"]:
        print("\n" + streams_section(summary) + "\n\n" + law_section(summary), flush=True)
