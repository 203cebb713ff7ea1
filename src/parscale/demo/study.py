"""The study behind `parscale demo`: a thin orchestration of the library.

    cfg = DemoConfig.preset("runs/demo", budget="default")   # smoke | quick | default | full | law
    summary = run_demo(cfg)     # trains (or reuses) every run, measures them, writes the report

`parscale.demo.plan` says which runs there are and why; `runner` trains them two at a time;
`measure` reads each finished run; `stats` compares the settings over seeds; `report` writes
report.md, summary.json and the plots (`law_report` the `law` budget's report.md).
The law fit and the cost comparison of the paper's models are `parscale.law` and
`parscale.cost`, clearly labelled as the paper's data. Every run lives in `OUT/runs/NAME/`:
a finished run is reused, an interrupted one resumes, and a demo config that differs from
the one recorded in `OUT/demo.json` is refused rather than mixed in.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from parscale.demo.plan import LAW_DESIGNS, DemoConfig, RunSpec, law_design, plan, run_dir, train_config
from parscale.demo.stats import SEED_NOISE, comparisons, paired, settings_table  # noqa: F401 (re-exported)
from parscale.errors import UserError
from parscale.machine import cpu_info, gpu_info

log = logging.getLogger(__name__)
DEMO_FILE = "demo.json"


def check_demo_dir(cfg: DemoConfig) -> None:
    """Record the demo config in OUT, or refuse an OUT that holds a demo with other settings."""
    from parscale.demo.report import write_text
    from parscale.demo.runner import fill_missing

    path = cfg.out_dir / DEMO_FILE
    want = json.loads(json.dumps(cfg.identity()))
    if path.is_file():
        # an option added since that demo was recorded did not exist then: it had its default
        defaults = json.loads(json.dumps(type(cfg)(out=cfg.out, data=type(cfg.data)()).identity()))
        have = fill_missing(json.loads(path.read_text()), defaults)
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            detail = ", ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff)
            raise UserError(f"{cfg.out} already holds a demo with other settings ({detail}); "
                            f"rerun with the same flags, choose another --out, or delete {cfg.out} to start over")
        return
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(want, indent=1, sort_keys=True) + "\n")


def machine() -> dict[str, Any]:
    """The CPU (and the GPU, if torch sees one) and the load, to read every time in the report against."""
    cpu, gpu = cpu_info(), gpu_info()
    info: dict[str, Any] = {"cores": cpu["cores"], "load_average": list(os.getloadavg()), "cpu": cpu["name"],
                            "flags": cpu["summary"], "avx512": cpu["avx512"], "amx": cpu["amx"]}
    if gpu:
        info["gpu"] = gpu["name"]
    return info


def check_device(cfg: DemoConfig) -> None:
    """`law-gpu` is sized for a GPU: on a CPU its 75 runs would take days, so it is refused."""
    import torch

    if cfg.budget == "law-gpu" and not torch.cuda.is_available():
        raise UserError("--budget law-gpu trains on a CUDA GPU and torch sees none here; on a CPU run "
                        "--budget law, the same design at a tenth of the parameters and tokens")


def _prepare(tc) -> None:
    from parscale.data.prepare import prepare_data

    prepare_data(tc.data, cache_dir=tc.cache_dir)


# ---------------------------------------------------------------- reading the runs
def read_run(cfg: DemoConfig, spec: RunSpec, done: dict[str, Any], val_tokens) -> dict[str, Any]:
    """Everything the report says about one run."""
    from parscale.demo import measure

    tc = train_config(cfg, spec)
    final = Path(done["final"])
    model = measure.load(final)
    run: dict[str, Any] = {"name": spec.name, "label": spec.label, "P": spec.P, "kind": spec.kind,
                           "preset": spec.preset, "group": spec.group, "setting": spec.setting, "seed": spec.seed,
                           "baseline_setting": spec.baseline, "prefix_tokens": spec.prefix_tokens,
                           "source": spec.source, "train": spec.train, "attn_smooth": spec.attn_smooth,
                           "lr": tc.lr, "prefix_init_std": spec.prefix_init_std, "stream_lr_mult": spec.stream_lr_mult,
                           "prefix_mlp_hidden": spec.prefix_mlp_hidden, "stream_penalty": spec.stream_penalty,
                           "action": done["action"], "wall_seconds": done["wall_seconds"]}
    run.update(measure.metrics(tc))
    run.update(measure.params(model))
    run["train_flops"] = measure.train_flops(model, tc)
    run["init_backbone_sha256"] = measure.init_digest(tc)
    run["streams"] = measure.stream_diagnostics(model, val_tokens)
    if cfg.measure:
        ms = measure.decode_ms(final, cfg.decode_tokens)
        run["decode_ms_per_token"], run["decode_ms_per_token_bf16"] = ms["float32"], ms["bfloat16"]
        run["decode_ms_median"] = {"float32": ms["float32_median"], "bfloat16": ms["bfloat16_median"]}
    else:
        run["decode_ms_per_token"] = run["decode_ms_per_token_bf16"] = None
    if spec.source and spec.train == "streams":
        run["backbone_vs_source"] = measure.backbone_identical(final, run_dir(cfg, spec.source) / "final")
    return run


def relate(runs: list[dict[str, Any]]) -> None:
    """Δ against P = 1 of the same seed (and size), extra parameters, cumulative FLOPs, in place."""
    by = {r["name"]: r for r in runs}
    for r in runs:
        base_name = r["baseline_setting"] + r["name"][len(r["setting"]):]  # the same seed's P = 1 run
        base = by.get(base_name)
        base = None if base is r else base
        r["baseline"] = base_name if base else None
        r["delta_vs_p1"] = r["val_loss"] - base["val_loss"] if base else None
        r["extra_params"] = r["non_embedding_params"] - base["non_embedding_params"] if base else None
        source = by.get(r["source"]) if r["source"] else None
        r["total_flops"] = r["train_flops"] + (source["train_flops"] if source else 0.0)
        control = by.get("post-p1-control" + r["name"][len(r["setting"]):]) if r["group"] == "two-stage" else None
        r["delta_vs_control"] = r["val_loss"] - control["val_loss"] if control and control is not r else None


# ---------------------------------------------------------------- over seeds
def own_law(runs: list[dict[str, Any]], bootstrap: int = 200, plot: Path | None = None) -> dict[str, Any] | None:
    """The law fitted to our own from-scratch P = 1, 2, 4 runs over sizes, with bootstrap
    intervals (and its plot at `plot`)."""
    from parscale.law.fitting import fit
    from parscale.law.plot import plot_fit

    pts = [r for r in runs if r["group"] in ("scratch", "size", "law") and r["kind"] in ("p1", "streams")]
    sizes = {r["preset"] for r in pts}
    if len(sizes) < 3:
        return None
    # N of the law is the backbone's: a P-stream model of a size has the P = 1 model's N.
    n_of = {r["preset"]: r["non_embedding_params"] for r in pts if r["P"] == 1}
    n = [n_of[r["preset"]] for r in pts]
    try:
        res = fit(n, [r["P"] for r in pts], [r["val_loss"] for r in pts], bootstrap=bootstrap)
    except UserError as err:
        return {"identifiable": False, "reason": str(err), "points": len(pts)}
    lo, hi = res.ci["k"] if res.ci else (float("nan"), float("nan"))
    if plot is not None:
        plot_fit(res, plot, title="parallel scaling law fitted to our own runs (every seed a point)")
    return {"identifiable": bool(res.converged and hi - lo < 1.0), "E": res.E, "A": res.A, "alpha": res.alpha,
            "k": res.k, "k_ci": [lo, hi], "r2": res.r2, "points": len(pts), "converged": bool(res.converged),
            "at_bound": list(res.at_bound)}


def law_budget(runs: list[dict[str, Any]], train_tokens: int, budget: str = "law") -> dict[str, Any]:
    """What a law budget's report states beside its numbers: the premise check, tokens per
    parameter at each size, how often the data repeat, and k of the paper's two fits."""
    from parscale.demo.stats import premise
    from parscale.law.fitting import fit
    from parscale.law.points import load_points

    tokens = max(r["tokens"] for r in runs)  # every run of the budget trains on the same tokens
    n_of = {r["preset"]: r["non_embedding_params"] for r in runs if r["kind"] in ("p1", "wide")}
    paper_k = {}
    for name in ("paper-stack", "paper-pile"):
        pts = load_points(name)
        paper_k[name] = fit(pts.params, pts.streams, pts.loss).k
    return {"premise": premise(runs, law_design(budget)), "tokens_per_run": tokens, "train_tokens": train_tokens,
            "epochs": tokens / train_tokens, "N": n_of, "tokens_per_param": {k: tokens / n for k, n in n_of.items()},
            "paper_k": paper_k}


# ---------------------------------------------------------------- the paper's law and costs
def paper_law(out: Path) -> dict[str, Any]:
    """The parallel scaling law fitted to the paper's Stack-V2-Python runs, with its plot."""
    from parscale.law.fitting import fit, multiplier
    from parscale.law.points import load_points
    from parscale.law.plot import plot_fit

    pts = load_points("paper-stack")
    res = fit(pts.params, pts.streams, pts.loss)
    plot_fit(res, out / "law_fit.png", title=f"parallel scaling law, {pts.source} (the paper's data)")
    return {"data": pts.source, "points": int(len(pts.loss)), "E": res.E, "A": res.A, "alpha": res.alpha,
            "k": res.k, "r2": res.r2, "converged": bool(res.converged),
            "max_abs_error": float(abs(res.errors).max()),
            "multipliers": {str(p): float(multiplier(res.k, p)) for p in (1, 2, 4, 8)}}


def paper_cost(out: Path) -> dict[str, Any]:
    """Streams against parameter scaling for the paper's 1.6B model on an A100 (a model, not a measurement)."""
    from parscale.cost.compare import Comparator, compare, parse_reference
    from parscale.cost.hardware import resolve
    from parscale.cost.plot import plot_compare
    from parscale.cost.roofline import PRESETS, Workload

    base, ref = PRESETS["1.6B"], parse_reference("observed:paper-stack")
    lengths = [64, 128, 256, 512]  # averaged, input = output, as in the paper's Figure 4
    cmp = Comparator(resolve("a100-80gb"), lengths, Workload())
    rows = compare(base, ref, [2, 4, 8], [1, 2, 4, 8], cmp)
    plot_compare(base, ref, rows, cmp, out / "cost_compare.png")
    return {"model": "1.6B", "hardware": "a100-80gb", "reference": ref.name, "lengths": lengths, "rows": rows}


# ---------------------------------------------------------------- the whole study
def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train or reuse every run, measure them, and write the report into OUT."""
    from parscale.data.prepare import prepare_data
    from parscale.demo import runner
    from parscale.demo.report import print_tables, write_report

    check_device(cfg)  # before check_demo_dir writes OUT/demo.json: a refused budget leaves nothing behind
    check_demo_dir(cfg)
    specs = plan(cfg)
    at_start = machine()
    print(f"[demo] budget {cfg.budget}: {len(specs)} runs, {cfg.workers} at a time, one thread each; "
          f"load average {at_start['load_average'][0]:.1f} on {at_start['cores']} cores", flush=True)
    start = time.perf_counter()
    with runner.Pool(cfg.workers) as pool:
        parallel = runner.parallel_check(pool, steps=2 if cfg.budget == "smoke" else 10)
        t0 = time.perf_counter()
        done = runner.train_all(cfg, specs, pool, _prepare)
        parallel["runs_wall_s"] = time.perf_counter() - t0
    parallel["runs_sum_s"] = sum(d["wall_seconds"] for d in done.values())
    parallel["reused"] = sum(d["action"] == "reused" for d in done.values())
    parallel["runs"] = len(done)
    print("[demo] measuring every run (held-out metrics, decode latency in float32 and bfloat16)", flush=True)
    data = prepare_data(cfg.data, cache_dir=cfg.out_dir / "data")
    runs = [read_run(cfg, spec, done[spec.name], data.val[: cfg.eval_tokens]) for spec in specs]
    relate(runs)
    law = cfg.budget in LAW_DESIGNS
    summary = {"budget": cfg.budget, "config": cfg.to_dict(), "machine": {"start": at_start, "end": machine()},
               "parallel": parallel, "runs": runs, "settings": settings_table(runs),
               "comparisons": comparisons(runs), "own_law": own_law(runs, plot=cfg.out_dir / "own_law_fit.png"),
               "paper_law": paper_law(cfg.out_dir), "paper_cost": None if law else paper_cost(cfg.out_dir)}
    if law:
        summary["law"] = law_budget(runs, len(data.train), cfg.budget)
    summary["wall_seconds"] = time.perf_counter() - start
    if law:
        from parscale.demo.law_report import law_markdown, print_law

        write_report(summary, cfg.out_dir, markdown=law_markdown)
        print_law(summary)
    else:
        write_report(summary, cfg.out_dir)
        print_tables(summary)
    return summary
