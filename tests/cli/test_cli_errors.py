"""Every verb, every kind of bad input, as a user meets it: a subprocess that exits with 2,
prints exactly one error line naming the problem (no traceback), and changes nothing that
was already written.
"""
from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parscale.errors import UserError, describe_os_error
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import to_parscale

from test_generate import char_tokenizer

NO_CUDA = not torch.cuda.is_available()


def cli(args: list[str], cwd: Path, preexec=None, warnings_as_errors: bool = False, timeout: float = 300):
    flags = ["-W", "error"] if warnings_as_errors else []
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, *flags, "-m", "parscale", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env, preexec_fn=preexec)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_error(result, verb: str, *words: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr[-2000:]
    prefix = "parscale: error:" if verb == "" else f"parscale {verb}: error:"
    assert errors[0].startswith(prefix), errors[0]
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with a saved model (and its tokenizer), damaged copies of it, a file, a law."""
    root = tmp_path_factory.mktemp("world")
    model = to_parscale(_tiny(), ParScaleConfig(2, 3), seed=0).eval()
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    for name, damage in (("truncated", lambda b: b[: len(b) // 2]), ("garbage", lambda b: b"not weights" * 40)):
        shutil.copytree(root / "model", root / name)
        weights = root / name / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
    shutil.copytree(root / "model", root / "no-tokenizer")
    for f in (root / "no-tokenizer").glob("*token*"):
        f.unlink()
    (root / "afile").write_text("a file, not a folder\n")
    (root / "law.json").write_text('{"old": true}\n')
    (root / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    return root


def _tiny():
    from conftest import build_tiny

    return build_tiny("qwen2")


CASES = {
    "mistyped verb": ("", ["trian"], ["did you mean 'train'"]),
    "mistyped cost sub-verb": ("cost", ["cost", "compar"], ["did you mean 'compare'"]),
    "fit --plot under a file": ("fit", ["fit", "--data", "paper-stack", "--bootstrap", "0", "--save-law", "law.json",
                                        "--plot", "afile/fit.png"], ["'afile' is a file"]),
    "fit --save-law on a folder": ("fit", ["fit", "--data", "paper-stack", "--bootstrap", "0", "--save-law", "model"],
                                   ["--save-law", "is a folder"]),
    "cost compare --plot under a file": ("cost", ["cost", "compare", "--preset", "1.6B", "--plot", "afile/c.png"],
                                         ["'afile' is a file"]),
    "train --out is a file": ("train", ["train", "--out", "afile"], ["--out 'afile' is a file"]),
    "train --resume of no run": ("train", ["train", "--resume", "model"], ["not a run directory"]),
    "train bad choice": ("train", ["train", "--schedule", "cosin", "--out", "r"], ["invalid choice", "cosine"]),
    "train bad range": ("train", ["train", "--steps", "0", "--out", "r"], ["--steps must be at least 1"]),
    "demo --out under a file": ("demo", ["demo", "--out", "afile/demo"], ["'afile' is a file"]),
    "eval truncated weights": ("eval", ["eval", "--model", "truncated", "--data", "corpus.txt"],
                               ["truncated/model.safetensors is truncated or not a safetensors file"]),
    "eval --model is a file": ("eval", ["eval", "--model", "afile"], ["afile"]),
    "generate garbage weights": ("generate", ["generate", "--model", "garbage", "--prompt", "x"],
                                 ["garbage/model.safetensors is truncated or not a safetensors file"]),
    "generate without tokenizer": ("generate", ["generate", "--model", "no-tokenizer", "--prompt", "x"],
                                   ["no tokenizer"]),
}
if NO_CUDA:
    CASES["train --device cuda"] = ("train", ["train", "--out", "run", "--device", "cuda"], ["no CUDA"])
    CASES["generate --device cuda"] = ("generate", ["generate", "--model", "model", "--prompt", "x",
                                                    "--device", "cuda"], ["CUDA"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_changes_nothing(world, case):
    verb, args, words = CASES[case]
    before = snapshot(world)
    assert_one_error(cli(args, cwd=world), verb, *words)
    assert snapshot(world) == before  # nothing written, nothing changed
    assert not (world / "run").exists() and not (world / "r").exists()  # no --out left behind


def _no_space_after(limit: int):
    """A full disk, as a file-size limit: writes past `limit` bytes fail (EFBIG) instead of killing."""
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_full_disk_is_one_line_and_keeps_the_old_file(world):
    before = snapshot(world)
    result = cli(["fit", "--data", "paper-stack", "--bootstrap", "0", "--save-law", "law.json"], cwd=world,
                 preexec=_no_space_after(64))
    assert_one_error(result, "fit", "law.json", "File too large")
    assert snapshot(world) == before  # the old law.json intact, no temporary file left


def test_save_pretrained_onto_a_file_names_the_path(world, tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    model = to_parscale(_tiny(), ParScaleConfig(2, 3))
    with pytest.raises(UserError, match="cannot save the model to .*taken"):
        model.save_pretrained(blocker)
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("code,word", [(errno.EACCES, "permission"), (errno.ENOSPC, "disk is full"),
                                       (errno.ENOTDIR, "not a folder"), (errno.EROFS, "read-only")])
def test_file_system_errors_read_as_one_line(code, word):
    line = describe_os_error(OSError(code, os.strerror(code), "/some/where.json"))
    assert "'/some/where.json'" in line and word in line and "\n" not in line


def test_no_permission_is_refused_before_any_work(tmp_path, monkeypatch):
    from parscale import atomic

    monkeypatch.setattr(atomic.os, "access", lambda path, mode: False)  # the tests run as root
    with pytest.raises(UserError, match="no permission to write in"):
        atomic.check_writable(tmp_path / "plot.png", "--plot")
