"""`parscale demo`: the end-to-end mini-study (about 10 minutes on two CPU cores).

    parscale demo [--out runs/demo] [--quick] [--scale F] [--seed S]

Re-running with the same flags reuses the finished runs, resumes an interrupted one and
rewrites the report; other flags on an existing --out are refused.
"""
from __future__ import annotations

import argparse
import logging
import shlex

from parscale.errors import UserError
from parscale.interrupt import Interrupted


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="parscale demo",
        description="Pretrain a tiny P=1 model on the Python standard library, post-train it with "
                    "P=1/2/4 streams, generate, fit the scaling law, compare inference costs, and write "
                    "OUT/report.md, OUT/summary.json and the plots.")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke version: 60 + 20 steps, about 1.5 minutes with data preparation")
    p.add_argument("--scale", type=float, default=1.0, metavar="F", help="multiply every step count by F (default 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="training seed of every run (default 0)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads (default 1: the tiny model's matrices are too small for more "
                        "threads to pay, and on a busy machine extra threads slow it down)")
    p.add_argument("--no-measure", action="store_true", help="skip timing the tiny model on this CPU")
    return p


def main(argv: list[str]) -> int:
    from parscale.atomic import check_writable

    args = build_parser().parse_args(argv)  # `--help` ends here, before torch is imported
    from parscale.demo.study import DemoConfig, run_demo

    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    check_writable(args.out, "--out", folder=True)
    import torch

    torch.set_num_threads(args.threads)  # process-wide, so set here at the entry point only
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = DemoConfig.preset(args.out, quick=args.quick, scale=args.scale, seed=args.seed,
                            measure_cost=not args.no_measure)
    try:
        run_demo(cfg)
    except Interrupted as err:  # the run's own hint names `parscale train`; the demo resumes itself
        done = err.message.split(";")[0]
        raise Interrupted(err.signum, f"{done}; finished runs and checkpoints are kept, continue with: "
                                      f"parscale demo {shlex.join(argv)}".rstrip()) from None
    print(f"\nreport: {cfg.out_dir / 'report.md'} (numbers in summary.json; plots losses.png, "
          "law_fit.png, cost_compare.png)")
    return 0
