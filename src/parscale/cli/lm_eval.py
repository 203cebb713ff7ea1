"""`parscale lm-eval ARGS`: lm-evaluation-harness's own command line, with `--model parscale` known.

    parscale lm-eval --model parscale --model_args pretrained=DIR,streams=ADAPTER_DIR --tasks TASK --device cpu

Every argument goes to lm-eval unchanged. `--help` prints this page at once; `--help-lm-eval`
prints lm-eval's own list of options (importing lm-eval takes many seconds). Before lm-eval
is imported, its presence (the `eval` extra) and the directories `pretrained=` and
`streams=` name are checked.
"""
from __future__ import annotations

import argparse
import json

from parscale.errors import require_extra


def model_args(argv: list[str]) -> dict[str, str] | None:
    """`--model_args` of a `--model parscale` command line as a dict (None for another model).

    Read as lm-eval reads it: a JSON object, or `key=value` items separated by commas or spaces."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--model", "-M")
    p.add_argument("--model_args", "-a", nargs="+", default=[])
    known, _ = p.parse_known_args(argv)
    if known.model != "parscale":
        return None
    found: dict[str, str] = {}
    for value in known.model_args:
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            found.update({k: str(v) for k, v in parsed.items()})
            continue
        for item in value.split(","):
            key, eq, val = item.partition("=")
            if eq:
                found[key.strip()] = val.strip()
    return found


def check_args(argv: list[str]) -> None:
    """Every check that needs neither lm-eval nor a model: the extra, the model and adapter directories."""
    from parscale.cli.model_dir import check_adapter_dir, check_model_dir

    require_extra("lm_eval", "the evaluation harness (lm-eval)")
    args = model_args(argv)
    if not args:
        return
    if args.get("pretrained"):
        check_model_dir(args["pretrained"], "pretrained=",
                        adapter_fix=f"use --model_args pretrained=BACKBONE,streams={args['pretrained']}")
    if args.get("streams"):
        check_adapter_dir(args["streams"], "streams=")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    check_args(argv)
    from parscale.evaluate import harness

    return harness.main(["--help"] if argv[0] == "--help-lm-eval" else argv)
