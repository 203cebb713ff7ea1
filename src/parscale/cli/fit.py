"""`parscale fit`: fit the parallel scaling law to runs, print it, predict from it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from parscale.law import fitting as L
from parscale.cli.options import Parser, hide
from parscale.errors import UserError, require_extra
from parscale.law.points import PAPER_DATASETS, load_points
from parscale.atomic import atomic_write_json, check_writable

MULTIPLIER_P = (1, 2, 4, 8, 16, 32)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="parscale fit",
        description="Fit L(N, P) = E + (A*1e9 / (N*(k*ln P + 1)))^alpha to (params, P, loss) points.",
    )
    hide(ap.add_argument("--data", "--data-files", required=True,
                         help=f"{' | '.join(PAPER_DATASETS)} | FILE.csv | FILE.jsonl (columns params, P, loss)"),
         "--data-files")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    ap.add_argument("--plot", metavar="PNG", help="draw loss against N with the fitted curves")
    ap.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                    help="bootstrap resamples for 95%% CIs (default 1000; 0 turns CIs off)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    ap.add_argument("--predict", nargs="+", default=[], metavar="N,P",
                    help="predict the loss at these points, e.g. --predict 7e9,1 1.8e9,8")
    ap.add_argument("--need-streams", nargs="+", default=[], metavar="LOSS,N",
                    help="the P a loss target needs at N parameters, e.g. 1.0,2e9")
    ap.add_argument("--need-params", nargs="+", default=[], metavar="LOSS,P",
                    help="the N a loss target needs with P streams, e.g. 1.0,8")
    ap.add_argument("--holdout-largest", action="store_true",
                    help="fit without the largest model of each P and report its prediction error")
    ap.add_argument("--save-law", metavar="JSON", help="write E, A, alpha, k (and the fit) to this file")
    return ap


def _pairs(values: list[str], flag: str, names: tuple[str, str]) -> list[tuple[float, float]]:
    out = []
    for text in values:
        parts = text.split(",")
        try:
            a, b = (float(x) for x in parts)
        except ValueError:
            raise UserError(f"{flag} {text!r}: expected two numbers {names[0]},{names[1]}, e.g. 1.0,8") from None
        if not (a > 0 and b > 0 and np.isfinite(a) and np.isfinite(b)):
            raise UserError(f"{flag} {text!r}: both {names[0]} and {names[1]} must be positive")
        out.append((a, b))
    return out


def run(args: argparse.Namespace) -> tuple[dict, tuple]:
    """Everything the command reports, as one JSON-ready dict (the tables print from it),
    plus what the plot needs: (fit result, data source, extrapolation check or None)."""
    for flag, path in (("--plot", args.plot), ("--save-law", args.save_law)):
        if path:
            check_writable(path, flag)  # before the fit, not after it
    if args.plot:
        require_extra("matplotlib", "--plot")
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be 0 (off) or a number of resamples, got {args.bootstrap}")
    predict_at = _pairs(args.predict, "--predict", ("N", "P"))
    need_streams = _pairs(args.need_streams, "--need-streams", ("LOSS", "N"))
    need_params = _pairs(args.need_params, "--need-params", ("LOSS", "P"))
    for _, p in predict_at:
        if p < 1:
            raise UserError(f"--predict: P must be at least 1, got {p}")
    pts = load_points(args.data)
    n, p, y = pts.params, pts.streams, pts.loss
    held = L.largest_size_mask(n, p)
    keep = ~held if args.holdout_largest else np.ones(len(n), bool)
    if keep.sum() < L.MIN_POINTS:
        raise UserError(f"--holdout-largest leaves {int(keep.sum())} points; the fit needs {L.MIN_POINTS}")
    res = L.fit(n[keep], p[keep], y[keep], bootstrap=args.bootstrap, seed=args.seed)
    out = {"data": pts.source, **res.to_dict()}
    if pts.labels:
        for point, label in zip(out["points"], np.asarray(pts.labels)[keep]):
            point["label"] = str(label)
    try:
        check = L.extrapolation_check(n, p, y, mask=held)
    except UserError as err:
        check = {"skipped": str(err)}
    out["extrapolation"] = check
    out["multipliers"] = {str(q): float(L.multiplier(res.k, q)) for q in MULTIPLIER_P}
    out["predictions"] = [{"params": a, "P": b, "loss": float(res.predict(a, b)), "beyond_data_P": res.beyond_data_p(b)}
                          for a, b in predict_at]
    out["need_streams"] = []
    for t, a in need_streams:
        q = L.streams_for_loss(res.law, t, a)
        out["need_streams"].append({"target": t, "params": a, "P": q, "beyond_data_P": q > 1 and res.beyond_data_p(q)})
    out["need_params"] = [{"target": t, "P": b, "params": L.params_for_loss(res.law, t, b),
                           "beyond_data_P": res.beyond_data_p(b)} for t, b in need_params]
    out["warnings"] = warnings(res, out)
    if args.save_law:
        _write_json_atomic(Path(args.save_law), {**res.law.to_dict(), "source": pts.source,
                                                 "objective": res.objective, "r2": res.r2})
    return out, (res, pts.source, None if "skipped" in check else check)


def warnings(res: L.FitResult, out: dict) -> list[str]:
    """What makes the fit or a prediction less trustworthy than its numbers look."""
    found = []
    for name in res.at_bound:
        found.append(f"{name} is at its lower bound (0): these points do not determine it, so the fit is a "
                     "boundary solution and its predictions deserve caution (more or larger model sizes help)")
    lo, hi = res.p_range
    beyond = sorted({q["P"] for key in ("predictions", "need_streams", "need_params") for q in out[key]
                     if q["beyond_data_P"]})
    if beyond:
        shown = ", ".join(f"{q:.3g}" for q in beyond)
        found.append(f"P = {shown} lies beyond the P range of the data ({lo:g} to {hi:g}): the law is "
                     "extrapolated in P there")
    return found


def _write_json_atomic(path: Path, data: dict) -> None:
    atomic_write_json(path, data)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns sized to their widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells) -> str:
        return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _fmt_n(x: float) -> str:
    return f"{x / 1e9:.3f}B" if x >= 1e8 else f"{x / 1e6:.2f}M"


def render(out: dict) -> str:
    """The human-readable report."""
    ci = out.get("ci")
    parts = [f"parallel scaling law fit: {out['data']}, {len(out['points'])} points",
             "L(N, P) = E + (A*1e9 / (N*(k*ln P + 1)))^alpha", ""]
    labelled = any("label" in pt for pt in out["points"])
    rows = [([pt.get("label", "")] if labelled else []) + [
        f"{pt['P']:g}", _fmt_n(pt["params"]), f"{pt['loss']:.4f}", f"{pt['predicted']:.4f}",
        f"{100 * pt['error']:+.2f}%"] for pt in out["points"]]
    parts += [_table((["label"] if labelled else []) + ["P", "N", "loss", "predicted", "error"], rows), ""]
    head = ["parameter", "value"] + ([f"{100 * out['ci_level']:.0f}% CI ({out['bootstrap_samples']} bootstrap)"]
                                     if ci else [])
    prow = [[k, f"{out[k]:.5g}"] + ([f"[{ci[k][0]:.5g}, {ci[k][1]:.5g}]"] if ci else []) for k in L.NAMES]
    parts += [_table(head, prow), "",
              f"objective (Huber, delta=1e-3, on log L): {out['objective']:.6e}",
              f"R^2 (on the loss): {out['r2']:.5f}",
              f"converged: {'yes' if out['converged'] else 'NO'} (best of {out['n_starts']} starts)"]
    parts += [f"warning: {w}" for w in out["warnings"] if "lower bound" in w] + [""]
    lo, hi = out["P_range"]
    mult = [[q, f"{m:.3f}" + ("  " if lo <= float(q) <= hi else " *")] for q, m in out["multipliers"].items()]
    parts += ["equivalent parameter multiplier k*ln P + 1 (P streams act like this many times N):",
              _table(["P", "multiplier  "], mult)]
    if any(row[1].endswith("*") for row in mult):
        parts.append(f"* beyond the P range of the data ({lo:g} to {hi:g}): extrapolated")
    parts.append("")
    ex = out["extrapolation"]
    if "skipped" in ex:
        parts += [f"extrapolation check skipped: {ex['skipped']}", ""]
    else:
        rows = [[f"{b:g}", _fmt_n(a), f"{c:.4f}", f"{d:.4f}", f"{100 * e:+.2f}%"]
                for a, b, c, d, e in zip(ex["params"], ex["P"], ex["loss"], ex["predicted"], ex["error"])]
        parts += ["extrapolation check: fit without the largest model of each P, then predict it:",
                  _table(["P", "N", "loss", "predicted", "error"], rows),
                  f"max |error|: {100 * ex['max_abs_error']:.2f}%", ""]
    if out["predictions"]:
        rows = [[f"{q['P']:g}", _fmt_n(q["params"]), f"{q['loss']:.4f}" + (" *" if q["beyond_data_P"] else "  ")]
                for q in out["predictions"]]
        parts += ["predictions (* beyond the P range of the data):", _table(["P", "N", "predicted loss  "], rows), ""]
    for q in out["need_streams"]:
        msg = ("P = 1 already reaches it" if q["P"] <= 1 else f"P >= {q['P']:.3g}")
        parts.append(f"loss {q['target']:g} at N = {_fmt_n(q['params'])}: {msg}")
    for q in out["need_params"]:
        parts.append(f"loss {q['target']:g} with P = {q['P']:g}: N >= {_fmt_n(q['params'])}")
    parts += [f"warning: {w}" for w in out["warnings"] if "lower bound" not in w]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    out, (res, source, held_out) = run(args)
    # Print first, then plot: importing matplotlib costs about a second.
    print(json.dumps(out, indent=2) if args.json else render(out), end="" if not args.json else "\n", flush=True)
    if args.plot:
        from parscale.law.plot import plot_fit

        plot_fit(res, args.plot, title=f"parallel scaling law: {source}", held_out=held_out)
    if args.plot and not args.json:
        print(f"plot written to {args.plot}")
    if args.save_law and not args.json:
        print(f"law written to {args.save_law}")
    return 0
