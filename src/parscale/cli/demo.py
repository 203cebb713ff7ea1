"""`parscale demo`: the mini-study (about 10 minutes on two CPU cores at the default budget).

    parscale demo [--out runs/demo] [--budget smoke|quick|default|full|law|law-gpu] [--scale F] [--seed S] [--seeds N]
                  [--only SETTING,...]

Re-running with the same flags reuses the finished runs, resumes an interrupted one and
rewrites the report; other flags on an existing --out are refused.
"""
from __future__ import annotations

import argparse
import os
import shlex

from parscale.cli.options import Parser
from parscale.errors import UserError, require_extra
from parscale.interrupt import Interrupted

BUDGETS = ("smoke", "quick", "default", "full", "law", "law-gpu")  # parscale.demo.plan.BUDGETS, without importing torch
BUDGET_HELP = ("how long the study runs (default: default): smoke, seconds (a few steps per run on a handful of "
               "files, for tests); quick, about 3 min; default, about 10 min on two cores; full, the multi-seed "
               "study of docs/mini-study.md (about 2 h); law, three small sizes trained on 20+ tokens per "
               "parameter, the premise of the law checked first (87 min measured on two cores); law-gpu, the same design at 10x the "
               "parameters and tokens on one CUDA GPU, 4 runs at a time")


DEFAULT_BUDGET = "default"


def default_workers(budget: str = DEFAULT_BUDGET) -> int:
    """Two runs at a time where there are two cores, one thread each; on a GPU (`law-gpu`) four,
    whose small models leave the GPU waiting on each process's kernel launches."""
    if budget == "law-gpu":
        return 4
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="parscale demo",
        description="Train P=1, 2, 4, a one-prefix P=1 control and a wider P=1 model from scratch on the Python "
                    "standard library, post-train P=1 into streams, measure loss, time, FLOPs and decode "
                    "latency, and write OUT/report.md, OUT/summary.json and the plots.")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--budget", choices=BUDGETS, default=None, help=BUDGET_HELP)
    p.add_argument("--quick", action="store_true", help="the same as --budget quick (kept for old scripts)")
    p.add_argument("--scale", type=float, default=1.0, metavar="F", help="multiply every step count by F (default 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="added to every run's seed (default 0)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="paired seeds per setting (default: the budget's, 1, or 4 for full, 3 for law); with N >= 2 the "
                        "report gives each comparison's mean paired difference and standard error")
    p.add_argument("--only", default=None, metavar="SETTING,...",
                   help="run only these settings of the budget (e.g. p1-prefix,p2,p2-smooth0.1) and the runs they "
                        "continue from, over every seed; later invocations into the same --out reuse them, so a "
                        "study can be run in pieces")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="runs at a time, one thread each (default 2 on a machine with 2 or more cores, else 1; "
                        "4 for law-gpu)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads of this process, which measures decoding (default 1)")
    p.add_argument("--no-measure", action="store_true", help="skip timing decoding")
    return p


def main(argv: list[str]) -> int:
    from parscale.atomic import check_writable

    args = build_parser().parse_args(argv)  # `--help` ends here, before torch is imported
    from parscale.demo.plan import DemoConfig
    from parscale.demo.study import run_demo

    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.quick and args.budget not in (None, "quick"):
        raise UserError(f"--quick means --budget quick; it cannot be combined with --budget {args.budget}")
    budget = args.budget or ("quick" if args.quick else DEFAULT_BUDGET)
    workers = args.workers if args.workers is not None else default_workers(budget)
    check_writable(args.out, "--out", folder=True)
    require_extra("matplotlib", "the demo's plots")
    import torch

    torch.set_num_threads(args.threads)  # process-wide, so set here at the entry point only
    options = {} if args.seeds is None else {"seeds": tuple(range(args.seeds))}
    if args.only is not None:
        options["only"] = tuple(o.strip() for o in args.only.split(",") if o.strip())
        if not options["only"]:
            raise UserError("--only needs at least one setting name, e.g. --only p1-prefix,p2")
    cfg = DemoConfig.preset(args.out, budget=budget, scale=args.scale, seed=args.seed, workers=workers,
                            measure=not args.no_measure, **options)
    try:
        run_demo(cfg)
    except Interrupted as err:  # the run's own hint names `parscale train`; the demo resumes itself
        done = err.message.split(";")[0]
        raise Interrupted(err.signum, f"{done}; finished runs and checkpoints are kept, continue with: "
                                      f"parscale demo {shlex.join(argv)}".rstrip()) from None
    print(f"\nreport: {cfg.out_dir / 'report.md'} (numbers in summary.json)")
    return 0
