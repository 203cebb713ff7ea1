"""Atomic, pickle-free checkpoints: `RUN_DIR/ckpt-0000100/` plus a `latest` pointer.

A checkpoint is written into a `.tmp-*` directory inside the run directory, every file is
fsynced, and the directory is renamed into place with `os.replace`; the `latest` file is
replaced the same way. A run killed mid-write therefore leaves only a temp directory, which
the next start ignores and deletes. Nothing is pickled: weights go through the model's
`save_pretrained` (safetensors), optimizer tensors into `optimizer.safetensors` with their
non-tensor state in JSON, and RNG states as tensors/JSON.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from parscale.atomic import atomic_write_text
from parscale.errors import UserError
from parscale.model.format import read_safetensors

log = logging.getLogger(__name__)

CKPT_PREFIX = "ckpt-"
TMP_PREFIX = ".tmp-"
# Fault injection for the resume tests: SIGKILL this process halfway through writing the
# checkpoint of the given step (after the weights, before the optimizer state).
KILL_ENV = "PARSCALE_KILL_DURING_CHECKPOINT"


def ckpt_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:07d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    for folder in [p for p in path.rglob("*") if p.is_dir()] + [path]:
        _fsync_dir(folder)


# ---------------------------------------------------------------- optimizer and RNG state
def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into safetensors-ready tensors and JSON-ready rest.

    Tensors are keyed `state/<param key>/<name>`; everything else (param groups, Python
    numbers in the per-parameter state) goes to the JSON side unchanged."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pkey, pstate in state["state"].items():
        plain = {}
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state/{pkey}/{name}"] = value.detach().to("cpu").contiguous()
            else:
                plain[name] = value
        rest["state"][str(pkey)] = plain
    rest["key_types"] = {str(k): type(k).__name__ for k in state["state"]}
    return tensors, rest


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten_optimizer_state` (keys regain their int/str type)."""
    key_types = rest.get("key_types", {})
    cast = {k: (int if t == "int" else str) for k, t in key_types.items()}
    state: dict[Any, dict[str, Any]] = {}
    for skey, plain in rest["state"].items():
        state[cast.get(skey, str)(skey)] = dict(plain)
    for name, tensor in tensors.items():
        _, pkey, field = name.split("/", 2)
        state.setdefault(cast.get(pkey, str)(pkey), {})[field] = tensor
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch (CPU and CUDA) RNG as tensors; Python and numpy RNG as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------- save / find / load
def save_checkpoint(run_dir: Path, step: int, model, optim_state: dict[str, Any],
                    trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Write `ckpt-{step}` atomically, point `latest` at it, and keep the last `keep_last`.

    `model` is an unsharded model (its `save_pretrained` writes safetensors);
    `optim_state` a full (unsharded) optimizer state dict."""
    run_dir = Path(run_dir)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=run_dir))
    model.save_pretrained(tmp / "model")
    from parscale.train.convert import save_prefix_encoder

    save_prefix_encoder(model, tmp)  # model/ holds the prefixes an MLP produced; the MLP goes beside it
    if os.environ.get(KILL_ENV) == str(step):
        log.warning("%s=%s: killing the process mid-checkpoint (test fault injection)", KILL_ENV, step)
        os.kill(os.getpid(), signal.SIGKILL)
    tensors, rest = flatten_optimizer_state(optim_state)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(rest))
    rng_tensors, rng_plain = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps(dict(trainer_state, step=step, rng=rng_plain)))
    _fsync_tree(tmp)
    final = run_dir / ckpt_name(step)
    if final.exists():  # a checkpoint of the same step from a run that was later resumed
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    atomic_write_text(run_dir / "latest", final.name + "\n")
    prune_checkpoints(run_dir, keep_last)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp directories are never listed)."""
    found = [p for p in Path(run_dir).glob(f"{CKPT_PREFIX}*")
             if p.is_dir() and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def clean_temp(run_dir: Path) -> None:
    """Delete what a killed writer left behind: `.tmp-*` files and directories."""
    for leftover in Path(run_dir).glob(f"{TMP_PREFIX}*"):
        log.info("removing an incomplete checkpoint write: %s", leftover.name)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint.

    Every `ckpt-*` directory is complete, because it appears only by an atomic rename. The
    `latest` file names the same checkpoint, except after a kill between the rename and
    the pointer update; then the newer directory wins."""
    found = list_checkpoints(Path(run_dir))
    return found[-1] if found else None


def check_intact(ckpt: Path) -> None:
    """A UserError naming the first damaged file: every safetensors header and JSON file must parse.

    A checkpoint appears only by an atomic rename, so damage means something outside the
    trainer changed it (a full disk on a copy, a truncated transfer); safetensors checks that
    each header covers its file exactly, which catches truncation without reading the tensors."""
    for path in sorted(Path(ckpt).rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as err:
            raise UserError(f"{path} is truncated or not a safetensors file ({err})") from err
    for path in sorted(Path(ckpt).rglob("*.json")):
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is not valid JSON ({err})") from err


def newest_intact_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files all read; each damaged newer one is named in a warning."""
    for ckpt in reversed(list_checkpoints(Path(run_dir))):
        try:
            check_intact(ckpt)
            return ckpt
        except UserError as err:
            log.warning("%s is damaged: %s; falling back to the previous complete checkpoint", ckpt.name, err)
    return None


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint was written at (from its trainer.json)."""
    return int(json.loads((Path(ckpt) / "trainer.json").read_text())["step"])


def load_checkpoint_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer state dict, trainer state) of a checkpoint; RNG states are restored."""
    tensors = read_safetensors(ckpt / "optimizer.safetensors")
    rest = json.loads((ckpt / "optimizer.json").read_text())
    trainer = json.loads((ckpt / "trainer.json").read_text())
    set_rng_state(read_safetensors(ckpt / "rng.safetensors"), trainer.pop("rng"))
    return unflatten_optimizer_state(tensors, rest), trainer


# ---------------------------------------------------------------- a finished run's final/, kept
def _kept_pairs(run_dir: Path, name: str) -> list[tuple[Path, Path]]:
    """(directory, where it is kept): the streams first, so a stop between the renames leaves final/."""
    return [(run_dir / "final-streams", run_dir / name.replace("final", "final-streams", 1)),
            (run_dir / "final", run_dir / name)]


def name_for_kept_final(run_dir: Path, step: int | None) -> str:
    """`final-step<step>` (`final-previous` when the step is unknown), refused if already taken."""
    name = f"final-step{step}" if step is not None else "final-previous"
    for source, target in _kept_pairs(Path(run_dir), name):
        if source.is_dir() and target.exists():
            raise UserError(f"{target} exists already, and this run would keep its current {source.name}/ "
                            "there; move it away, then resume again")
    return name


def keep_final(run_dir: Path, name: str) -> None:
    """Rename `final/` (and `final-streams/`) to `name`, one atomic rename each, the folder fsynced:
    an extended run's new final model must not overwrite the one other work was built on."""
    for source, target in _kept_pairs(Path(run_dir), name):
        if source.is_dir():
            if target.exists():
                raise UserError(f"{target} exists already; move it away, then resume again")
            os.replace(source, target)
    _fsync_dir(Path(run_dir))


def replace_dir(target: Path, write) -> None:
    """Write a directory beside `target` with `write(dir)`, then swap it in (no half-written state)."""
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=target.parent))
    write(tmp)
    old = target.parent / f"{TMP_PREFIX}old-{target.name}"
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
