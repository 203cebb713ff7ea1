"""`parscale VERB ...`: one command-line entry point, one module per verb.

Each verb lives in `parscale.cli.<verb>` and exposes `main(argv) -> int`, so a verb
owns its own flags (`parscale cost` even has sub-verbs) and importing the CLI stays cheap:
only the chosen verb's module, and so only its heavy dependencies, is imported.
"""
from __future__ import annotations

import importlib
import logging
import sys

from parscale.errors import UserError

VERBS: dict[str, str] = {
    "train": "pretrain or post-train a ParScale model (see `parscale train --help`)",
    "fit": "fit the parallel scaling law L(N, P) to runs and predict from it",
    "cost": "memory and latency of P streams against parameter scaling",
    "generate": "generate text with a saved ParScale model",
    "eval": "held-out loss of a saved model",
    "lm-eval": "lm-evaluation-harness with our models registered as `--model parscale`",
    "streams": "stream adapters: `parscale streams extract` cuts the streams out of a full model",
    "demo": "the end-to-end mini-study on the embedded corpus",
    "data": "prepare a large corpus as sharded token files (`parscale data prepare --help`)",
}


def _usage() -> str:
    lines = ["usage: parscale VERB [options]   (parscale VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {verb:<9} {text}" for verb, text in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"parscale: unknown verb {verb!r}; choose one of: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = importlib.import_module(f"parscale.cli.{verb.replace('-', '_')}")
    try:
        return int(module.main(rest) or 0)
    except (UserError, FileNotFoundError) as err:
        # User mistakes arrive as these types, with a message that names the fix.
        print(f"parscale {verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
