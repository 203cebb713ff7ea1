"""`parscale lm-eval ARGS`: lm-evaluation-harness's own command line, with `--model parscale` known.

    parscale lm-eval --model parscale --model_args pretrained=DIR,streams=ADAPTER_DIR --tasks TASK --device cpu

Every argument goes to lm-eval unchanged. `--help` prints this page at once; `--help-lm-eval`
prints lm-eval's own list of options (importing lm-eval takes many seconds).
"""
from __future__ import annotations


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    from parscale.evaluate import harness

    return harness.main(["--help"] if argv[0] == "--help-lm-eval" else argv)
