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
import time
from pathlib import Path

import pytest
import torch

from parscale.cli.main import VERBS
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


# ---------------------------------------------------------------- the run directory
def _hold_lock(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from parscale.train.lock import run_lock\n"
            "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_trainer_is_refused_and_a_dead_ones_lock_is_not(tmp_path):
    from parscale.train.lock import run_lock

    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        result = cli(["train", "--out", str(run), "--steps", "1"], cwd=tmp_path)
        assert_one_error(result, "train", "in use by another training process", f"pid {holder.pid}")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing else was touched
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait()
    with run_lock(run):  # the stale lock file of the dead process does not block
        pass


def test_a_run_that_failed_before_its_first_update_can_start_again(tmp_path, caplog):
    from parscale.train.config import TrainConfig, dump_yaml
    from parscale.train.loop import _prepare_run_dir

    cfg = TrainConfig(out=str(tmp_path / "run"), steps=5)
    cfg.run_dir.mkdir()
    dump_yaml(cfg, cfg.run_dir / "config.yaml")  # left by a start that failed afterwards
    with caplog.at_level("INFO"):
        _prepare_run_dir(cfg, resume=False)
    assert "stopped before its first update; starting it again" in caplog.text
    (cfg.run_dir / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n')  # a finished update
    with pytest.raises(UserError, match="already holds a run; continue it with --resume"):
        _prepare_run_dir(cfg, resume=False)


# ---------------------------------------------------------------- one consistent command line
def _all_parsers():
    import argparse
    from unittest import mock

    from parscale.cli import cost, demo, eval as eval_cli, fit, generate, train

    parsers = [fit.build_parser(), eval_cli.build_parser(), generate.build_parser(), demo.build_parser(),
               train.build_parser()]

    def grab(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        for sub in ([], ["compare"], ["grid"], ["measure"]):
            with pytest.raises(SystemExit):
                cost.main(sub)
    return parsers


def test_every_option_has_a_help_text():
    missing = [(p.prog, a.option_strings) for p in _all_parsers() for a in p._actions if not a.help]
    assert not missing


def test_the_same_option_has_the_same_name_in_every_verb():
    names = {p.prog: {s for a in p._actions for s in a.option_strings} for p in _all_parsers()}
    assert "--data-files" in names["parscale train"] and "--data-files" in names["parscale eval"]
    assert {"--tokenizer", "--data-tokenizer"} <= names["parscale train"] & names["parscale eval"]
    assert "--device" in names["parscale generate"] and "--device" in names["parscale eval"]
    assert "--prefix-tokens" in names["parscale train"] and "--prefix-tokens" in names["parscale cost compare"]
    from parscale.cli import eval as eval_cli

    old = eval_cli.build_parser().parse_args(["--model", "m", "--data", "a.txt", "--split-seed", "3",
                                              "--text-field", "body", "--val-fraction", "0.1"])
    new = eval_cli.build_parser().parse_args(["--model", "m", "--data-files", "a.txt", "--data-seed", "3",
                                              "--data-text-field", "body", "--data-val-fraction", "0.1"])
    assert vars(old) == vars(new)  # the old spellings stay as aliases


def test_version_help_and_underscores(tmp_path):
    import parscale

    assert cli(["--version"], cwd=tmp_path).stdout.strip() == f"parscale {parscale.__version__}"
    help_text = cli(["cost", "--help"], cwd=tmp_path).stdout
    assert all(sub in help_text for sub in ("compare", "grid", "measure"))
    result = cli(["fit", "--data", "paper-stack", "--bootstrap", "0", "--save_law", "law.json"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "law.json").is_file()


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_help_does_not_import_torch(verb):
    """`--help` has to start fast: without importing torch, lm-eval or vLLM (seconds each), only argparse."""
    code = (f"import sys\nfrom parscale.cli.main import main\ntry:\n    main([{verb!r}, '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted({'torch', 'lm_eval', 'vllm'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------- no warnings in normal use
README = Path(__file__).resolve().parents[2] / "README.md"
MICRO = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "tie_word_embeddings": True, "vocab_size": 300}


def _quiet(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr and "deprecated" not in result.stderr.lower(), result.stderr[-3000:]


@pytest.mark.slow
def test_quick_start_and_every_verb_run_with_warnings_as_errors(tmp_path):
    import json
    import re

    quick_start = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[0]
    _quiet(subprocess.run([sys.executable, "-W", "error", "-c", quick_start], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1")))
    from parscale.data.corpus import stdlib_root

    (tmp_path / "micro.json").write_text(json.dumps(MICRO))
    final = str(tmp_path / "run" / "final")
    runs = [  # training (with evaluations) first: eval and generate then use its model and tokenizer
        ["train", "--model-config", "micro.json", "--data-files", str(stdlib_root() / "textwrap.py"),
         "--data-val-files", str(stdlib_root() / "bisect.py"), "--data-vocab-size", "300", "--P", "2",
         "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-every", "1", "--out", "run"],
        ["eval", "--model", final, "--seq-len", "16", "--cache-dir", str(tmp_path / "cache")],
        ["generate", "--model", final, "--prompt", "def f(x):", "--max-new-tokens", "4", "--num-beams", "2"],
        ["fit", "--data", "paper-stack", "--bootstrap", "20", "--plot", "fit.png"],
        ["cost", "--preset", "1.6B", "--P", "4"],
        ["cost", "compare", "--preset", "1.6B", "--P", "2,4", "--batch-size", "1", "--plot", "cost.png"],
    ]
    for args in runs:
        _quiet(cli(args, cwd=tmp_path, warnings_as_errors=True))


# ---------------------------------------------------------------- Ctrl-C outside training
def test_ctrl_c_in_any_verb_is_one_line_and_exit_130(tmp_path):
    """`cost measure` times real decoding for a while; a Ctrl-C in the middle ends it cleanly."""
    proc = subprocess.Popen([sys.executable, "-m", "parscale", "cost", "measure", "--P", "1,2,4,8",
                             "--cache-dir", str(tmp_path)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        time.sleep(4)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "parscale cost: interrupted (SIGINT); nothing was saved"


def test_a_stopped_demo_says_how_to_continue_the_demo(tmp_path, monkeypatch, capsys):
    from parscale.cli.main import main
    from parscale.demo import study
    from parscale.interrupt import Interrupted

    def stopped(cfg):
        raise Interrupted(signal.SIGTERM, "stopped at step 7; continue with: parscale train --resume X")

    monkeypatch.setattr(study, "run_demo", stopped)
    assert main(["demo", "--out", str(tmp_path / "d"), "--quick"]) == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"parscale demo: stopped at step 7; finished runs and checkpoints are kept, "
                    f"continue with: parscale demo --out {tmp_path / 'd'} --quick")
