"""`parscale VERB ...`: one command-line entry point, one module per verb.

Each verb lives in `parscale.cli.<verb>` and exposes `main(argv) -> int`, so a verb
owns its own flags (`parscale cost` even has sub-verbs) and importing the CLI stays cheap:
only the chosen verb's module, and so only its heavy dependencies, is imported.

Every way a command can end badly ends here in one line: a user mistake (`UserError`), a
file-system error or a missing optional extra exits with 2, Ctrl-C with 130 and SIGTERM with
143; only a real bug shows a traceback. (Verbs check their extras before any work; the line
for a missing extra here is the net under those checks.)
"""
from __future__ import annotations

import difflib
import importlib
import logging
import sys

from parscale.cli.options import UnknownOption, option_names
from parscale.errors import EXTRAS, UserError, describe_os_error, missing_extra
from parscale.interrupt import Interrupted, immediate_stop

VERBS: dict[str, str] = {
    "train": "pretrain or post-train a ParScale model (see `parscale train --help`)",
    "fit": "fit the parallel scaling law L(N, P) to runs and predict from it",
    "cost": "memory and latency of P streams against parameter scaling (sub-verbs compare, grid, measure)",
    "generate": "generate text with a saved ParScale model",
    "eval": "held-out loss of a saved model",
    "lm-eval": "lm-evaluation-harness with our models registered as `--model parscale`",
    "streams": "stream adapters: `parscale streams extract` cuts the streams out of a full model",
    "demo": "the end-to-end mini-study on the embedded corpus",
    "serve": "serve a ParScale model with vLLM (OpenAI-compatible; needs parscale[serve])",
    "data": "prepare a large corpus as sharded token files (`parscale data prepare --help`)",
}

PASS_THROUGH = {"lm-eval"}  # verbs whose arguments belong to another program's parser


def _usage() -> str:
    lines = ["usage: parscale VERB [options]   (parscale VERB --help for a verb's options)",
             "       parscale --version", "", "verbs:"]
    lines += [f"  {verb:<9} {text}" for verb, text in VERBS.items()]
    return "\n".join(lines)


def _version() -> str:
    import parscale

    return f"parscale {parscale.__version__}"


def unknown_choice(what: str, given: str, choices) -> str:
    """'unknown verb 'trian'; did you mean 'train'? choose one of: ...' (shared with sub-verbs)."""
    close = difflib.get_close_matches(given, list(choices), n=1, cutoff=0.6)
    maybe = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {given!r}{maybe} (choose one of: {', '.join(choices)})"


def _dashes(arg: str) -> str:
    """`--seq_len=8` -> `--seq-len=8`: every verb takes either spelling of an option name."""
    name, eq, value = arg.partition("=")
    if name.startswith("--") and "_" in name and name[2:].replace("_", "").replace("-", "").isalnum():
        return name.replace("_", "-") + eq + value
    return arg


def verbs_taking(option: str, but: str) -> list[str]:
    """The verbs other than `but` that have `option` (those whose module builds one parser)."""
    found = []
    for verb in VERBS:
        if verb == but or verb in PASS_THROUGH:
            continue
        module = importlib.import_module(f"parscale.cli.{verb.replace('-', '_')}")
        if hasattr(module, "build_parser") and option in option_names(module.build_parser()):
            found.append(verb)
    return found


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(_version())
        return 0
    verb = argv[0]
    # lm-eval's own command line takes its own spellings (--model_args): passed on untouched
    rest = argv[1:] if verb in PASS_THROUGH else [_dashes(arg) for arg in argv[1:]]
    if verb not in VERBS:
        print(f"parscale: error: {unknown_choice('verb', verb, VERBS)}", file=sys.stderr)
        return 2
    # Our progress lines at INFO; other libraries (torch, transformers) only at WARNING, so their
    # INFO chatter (e.g. torch's FakeTensor cache stats at exit) never reaches the user.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("parscale").setLevel(logging.INFO)
    with immediate_stop():
        try:
            module = importlib.import_module(f"parscale.cli.{verb.replace('-', '_')}")
            return int(module.main(rest) or 0)
        except Interrupted as err:
            print(f"parscale {verb}: {err.message}", file=sys.stderr)
            return err.exit_code
        except KeyboardInterrupt:  # a Ctrl-C before the handler was installed
            print(f"parscale {verb}: interrupted; nothing was saved", file=sys.stderr)
            return 130
        except UnknownOption as err:
            print(f"parscale {verb}: error: {err.describe(verbs_taking(err.option, verb))}", file=sys.stderr)
            return 2
        except UserError as err:
            # User mistakes arrive as this type, with a message that names the fix.
            print(f"parscale {verb}: error: {err}", file=sys.stderr)
            return 2
        except ModuleNotFoundError as err:
            if (err.name or "").partition(".")[0] not in EXTRAS:
                raise  # not an optional extra: a broken installation, shown in full
            print(f"parscale {verb}: error: {missing_extra(err.name.partition('.')[0], 'this command')}",
                  file=sys.stderr)
            return 2
        except OSError as err:  # a path that cannot be read or written, a full disk
            print(f"parscale {verb}: error: {describe_os_error(err)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
