"""Ctrl-C and SIGTERM keep the work: the run stops at the next safe point with a checkpoint,
says how to continue in one line, exits 130 (143 for SIGTERM), and `--resume` then logs
exactly what an uninterrupted run logs. A second Ctrl-C stops at once, still cleanly.

The signals are real (sent to the real `python -m parscale train` subprocess, by itself at a
chosen update through the fault-injection variable, or from here while it runs).
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _trainkit import cli_args, micro_setup, read_metrics, run_train, subprocess_env, train_in_process
from test_resume import STEPS, _same_curve

from parscale.data.config import DataConfig
from parscale.data.prepare import prepare_data
from parscale.train.checkpoint import check_intact, list_checkpoints
from parscale.train.loop import KILL_STEP_ENV


def _last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def _clean_exit(result, code: int) -> str:
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return _last_line(result.stderr)


@pytest.fixture
def micro(tmp_path):
    opts = micro_setup(tmp_path)
    opts.update(P=2, steps=STEPS, eval_every=4, save_every=4, keep_last=2)
    prepare_data(DataConfig.from_dict(opts["data"]), cache_dir=opts["cache_dir"])  # shared by every run
    return opts


@pytest.mark.slow
def test_sigint_mid_run_keeps_a_checkpoint_and_resumes_exactly(tmp_path, micro):
    reference = tmp_path / "reference"
    train_in_process(out=str(reference), **micro)
    run = tmp_path / "run"

    # Ctrl-C in the middle of update 6: the update and its bookkeeping finish, a checkpoint
    # of step 6 is written although --save-every is 4, then one line and exit 130.
    stopped = run_train(cli_args(micro) + ["--out", str(run)], **{KILL_STEP_ENV: "6:INT"})
    line = _clean_exit(stopped, 130)
    assert line == f"parscale train: stopped at step 6; continue with: parscale train --resume {run}"
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-0000004", "ckpt-0000006"]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 7))
    assert not list(run.glob(".tmp-*"))

    resumed = run_train(["--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from ckpt-0000006" in resumed.stderr
    _same_curve(run, reference)


@pytest.mark.slow
def test_sigterm_and_a_second_ctrl_c(tmp_path, micro):
    run = tmp_path / "term"
    stopped = run_train(cli_args(micro) + ["--out", str(run)], **{KILL_STEP_ENV: "3:TERM"})
    assert _clean_exit(stopped, 143).startswith("parscale train: stopped at step 3;")
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-0000003"]

    # Two Ctrl-C in update 5: the second stops at once, before the update is applied; the
    # last checkpoint stays complete, nothing half-written is left as a checkpoint.
    again = run_train(["--resume", str(run)], **{KILL_STEP_ENV: "5:INT,INT"})
    assert "stopped at once" in _clean_exit(again, 130)
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-0000003", "ckpt-0000004"]
    for ckpt in list_checkpoints(run):
        check_intact(ckpt)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_ctrl_c_from_outside(tmp_path, micro):
    """A real Ctrl-C at an unknown moment of a long run."""
    micro.update(steps=5000, eval_every=0, save_every=0)
    run = tmp_path / "long"
    proc = subprocess.Popen([sys.executable, "-m", "parscale", "train", *cli_args(micro), "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").is_file() or len(read_metrics(run)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    step = len(read_metrics(run))
    assert _last_line(stderr) == f"parscale train: stopped at step {step}; continue with: parscale train --resume {run}"
    assert [p.name for p in list_checkpoints(run)] == [f"ckpt-{step:07d}"]


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, micro):
    reference = tmp_path / "reference"
    train_in_process(out=str(reference), **micro)
    run = tmp_path / "run"
    stopped = run_train(cli_args(micro) + ["--out", str(run)], **{KILL_STEP_ENV: "9"})  # SIGKILL
    assert stopped.returncode == -signal.SIGKILL
    newest = run / "ckpt-0000008" / "model" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated on a copy, say

    resumed = run_train(["--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"ckpt-0000008 is damaged: {newest} is truncated or not a safetensors file" in resumed.stderr
    assert "resuming from ckpt-0000004" in resumed.stderr
    _same_curve(run, reference)


@pytest.mark.slow
def test_resume_before_the_first_checkpoint_says_so(tmp_path, micro):
    run = tmp_path / "early"
    killed = run_train(cli_args(micro) + ["--out", str(run)], **{KILL_STEP_ENV: "2"})  # SIGKILL in update 2
    assert killed.returncode == -signal.SIGKILL and not list_checkpoints(run)
    resumed = run_train(["--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "has no complete checkpoint yet (the run stopped before its first one); starting again from step 0" \
        in resumed.stderr
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))
