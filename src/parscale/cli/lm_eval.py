"""`parscale lm-eval ARGS`: lm-evaluation-harness's own command line, with `--model parscale` known.

    parscale lm-eval --model parscale --model_args pretrained=DIR,streams=ADAPTER_DIR --tasks TASK --device cpu
"""
from __future__ import annotations


def main(argv: list[str]) -> int:
    from parscale.evaluate import harness

    return harness.main(argv)
