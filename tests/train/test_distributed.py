"""Data parallel under torchrun: 2 CPU processes (gloo), with DDP or FSDP, train exactly what
1 process trains with the same global batch, so the logged losses agree to float tolerance;
and an FSDP run killed mid-update resumes (its sharded optimizer state restored) on that
same curve."""
from __future__ import annotations

import subprocess
import sys

import pytest
from _trainkit import cli_args, micro_setup, read_metrics, subprocess_env, train_in_process

from parscale.data.prepare import DataConfig, prepare_data
from parscale.train.loop import KILL_STEP_ENV

STEPS = 6


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    opts = micro_setup(root)
    # 4000 held-out tokens: 125 sequences, 63 evaluation batches of 2 rows on 2 ranks, which
    # therefore hold unequal shares (32 and 31 batches; FSDP needs equal forward calls)
    opts.update(P=2, steps=STEPS, batch_size=4, eval_every=3, save_every=3, eval_tokens=4000)
    prepare_data(DataConfig.from_dict(opts["data"]), cache_dir=opts["cache_dir"])  # built once, read by all
    train_in_process(out=str(root / "one"), **opts)
    return root, opts


def _torchrun(args: list[str], **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "parscale", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(**env))


def _same_losses(a: list[dict], b: list[dict]) -> None:
    # Same data, same math; only the summation order differs (each rank averages its 2 rows,
    # then the gradients are averaged over the 2 ranks). In float32 that moves a loss near 5
    # by ~1e-6 per step, compounded over a few Adam steps: 1e-4 leaves a wide margin, while
    # a different batch, a missing gradient reduction or lost optimizer moments shift it by ~1e-2.
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))  # rank 0 logs alone
    for x, y in zip(a, b):
        assert y["train_loss"] == pytest.approx(x["train_loss"], abs=1e-4), x["step"]
        if "val_loss" in x:
            assert y["val_loss"] == pytest.approx(x["val_loss"], abs=1e-4), x["step"]


@pytest.mark.slow
def test_an_fsdp_run_killed_mid_update_resumes_on_the_same_curve(one_process):
    root, opts = one_process
    run = root / "fsdp-killed"
    killed = _torchrun([*cli_args({**opts, "fsdp": True}), "--out", str(run)], **{KILL_STEP_ENV: "5"})
    assert killed.returncode != 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]  # checkpoint at 3, killed in update 5
    resumed = _torchrun(["--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_losses(read_metrics(root / "one"), read_metrics(run))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(one_process, mode):
    root, opts = one_process
    run = root / mode
    two = _torchrun([*cli_args({**opts, "fsdp": mode == "fsdp"}), "--out", str(run)])
    assert two.returncode == 0, two.stderr[-3000:]
    _same_losses(read_metrics(root / "one"), read_metrics(run))
    assert (run / "final" / "model.safetensors").is_file()
    assert '"world_size": 2' in (run / "ckpt-0000006" / "trainer.json").read_text()
