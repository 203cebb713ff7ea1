"""What a directory given as a model (or as a stream adapter) is, when it is not one.

Every verb that takes a model calls `check_model_dir` before anything loads: a run directory
(not its `final/`), a training checkpoint, a stream adapter, a prepared data directory or a
damaged `config.json` would otherwise fail later, with a message about a missing tokenizer or
lines from transformers about tokenizer back-ends. `check_adapter_dir` does the same for
`--streams`. Only the file names are read (no torch, no transformers), so the checks cost
nothing and run before the first heavy import.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from parscale.errors import UserError

CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"  # model.adapters.ADAPTER_CONFIG, without importing torch
RUN_CONFIG = "config.yaml"  # what `parscale train` writes first into a run directory
CKPT_GLOB = "ckpt-*"  # train.checkpoint.CKPT_PREFIX
DATA_INDEX = "index.json"  # data.shards.INDEX


def check_model_dir(path: str | os.PathLike, flag: str = "--model", adapter_fix: str | None = None) -> Path:
    """`path` as a Path when it holds a model's config.json; otherwise a UserError saying what it is.

    `flag` is the option the user gave it with (`--model`, `--init-from`, `pretrained=`);
    `adapter_fix` is what to do when it is a stream adapter (default: `--model BACKBONE
    --streams DIR`, the spelling of eval and generate)."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise UserError(f"{_given(flag, path)} does not exist; give a model directory such as RUN_DIR/final")
    if not directory.is_dir():
        raise UserError(f"{_given(flag, path)} is a file; give the model's directory (the one holding {CONFIG})")
    config = directory / CONFIG
    if config.is_file():
        _check_config(config)
        return directory
    raise UserError(_not_a_model(directory, flag, adapter_fix))


def _given(flag: str, path: str | os.PathLike) -> str:
    """`--model 'DIR'`, or `pretrained=DIR` for a key of lm-eval's --model_args."""
    return f"{flag}{path}" if flag.endswith("=") else f"{flag} {str(path)!r}"


def _check_config(config: Path) -> None:
    try:
        raw = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config} is not valid JSON: {err}; the file is damaged: restore it or save the "
                        "model again") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{config} is not valid JSON: not UTF-8 text ({err.reason}); the file is damaged: "
                        "restore it or save the model again") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise UserError(f"{config} has no model_type, so it is not a transformers model's config; give the "
                        "directory save_pretrained wrote")


def _not_a_model(directory: Path, flag: str, adapter_fix: str | None) -> str:
    """The diagnosis of a directory without config.json: the most specific kind first."""
    d = str(directory)
    if (directory / ADAPTER_CONFIG).is_file():
        return f"{d} is a stream adapter: {adapter_fix or _default_adapter_fix(directory, flag)}"
    if (directory / "final" / CONFIG).is_file():
        return f"{d} is a run directory; its model is {directory / 'final'}: give {_given(flag, directory / 'final')}"
    if (directory / RUN_CONFIG).is_file():
        newest = max((c for c in directory.glob(CKPT_GLOB) if (c / "model" / CONFIG).is_file()),
                     default=None, key=lambda c: c.name)
        where = (f"; its newest checkpoint's model is {newest / 'model'}" if newest is not None
                 else "; it has no checkpoint yet")
        return (f"{d} is a run directory without final/ (the run has not finished){where}; "
                f"finish it with `parscale train --resume {d}`")
    if (directory / "model" / CONFIG).is_file():
        return (f"{d} is a training checkpoint; its model is {directory / 'model'}: "
                f"give {_given(flag, directory / 'model')}")
    if (directory / DATA_INDEX).is_file() and (directory / "tokenizer").is_dir():
        return (f"{d} is a prepared data directory (from `parscale data prepare`), not a model; "
                f"give {flag} a model directory such as RUN_DIR/final (train on the data with --data-dir {d})")
    return f"{d} has no {CONFIG}, so it is not a saved model; give {flag} the directory save_pretrained wrote, " \
           "such as RUN_DIR/final"


def _default_adapter_fix(directory: Path, flag: str) -> str:
    if flag != "--model":
        return f"it holds streams without their backbone; give {flag} a full model directory"
    base = _adapter_base(directory)
    return f"use --model {base or 'BACKBONE'} --streams {directory}"


def _adapter_base(directory: Path) -> str | None:
    """The backbone an adapter records (`base_model_name_or_path`), when that directory exists."""
    try:
        base = json.loads((directory / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) and base and Path(base).is_dir() else None


def check_adapter_dir(path: str | os.PathLike, flag: str = "--streams") -> Path:
    """`path` as a Path when it holds a stream adapter; otherwise a UserError saying what it is."""
    directory = Path(path).expanduser()
    if (directory / ADAPTER_CONFIG).is_file():
        return directory
    d = str(path)
    if not directory.is_dir():
        why = "does not exist" if not directory.exists() else "is a file"
        raise UserError(f"{_given(flag, path)} {why}; give a stream adapter directory (e.g. RUN_DIR/final-streams)")
    if (directory / "final-streams" / ADAPTER_CONFIG).is_file():
        raise UserError(f"{d} is a run directory; its stream adapter is {directory / 'final-streams'}: "
                        f"give {_given(flag, directory / 'final-streams')}")
    if (directory / CONFIG).is_file():
        raise UserError(f"{d} is a full model, not a stream adapter; cut its streams out with "
                        f"`parscale streams extract --model {d} --out ADAPTER_DIR`, or give it as --model")
    raise UserError(f"{d} has no {ADAPTER_CONFIG}, so it is not a stream adapter; give a directory "
                    "written by `parscale train --train streams` (RUN_DIR/final-streams) or `parscale streams extract`")
