"""Data parallel under torchrun: 2 CPU processes (gloo), with DDP or FSDP, train exactly what
1 process trains with the same global batch, so the logged losses agree to float tolerance."""
from __future__ import annotations

import subprocess
import sys

import pytest
from _trainkit import cli_args, micro_setup, read_metrics, subprocess_env, train_in_process

from parscale.data.prepare import DataConfig, prepare_data

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


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(one_process, mode):
    root, opts = one_process
    run = root / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "parscale", "train", *cli_args({**opts, "fsdp": mode == "fsdp"}), "--out", str(run)]
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(root / "one"), read_metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))  # rank 0 logs alone
    # Same data, same math; only the summation order differs (each rank averages its 2 rows,
    # then the gradients are averaged over the 2 ranks). In float32 that moves a loss near 5
    # by ~1e-6 per step, compounded over a few Adam steps: 1e-4 leaves a wide margin, while
    # a different batch or a missing gradient reduction shifts it by ~1e-2.
    for x, y in zip(a, b):
        assert y["train_loss"] == pytest.approx(x["train_loss"], abs=1e-4), x["step"]
        if "val_loss" in x:
            assert y["val_loss"] == pytest.approx(x["val_loss"], abs=1e-4), x["step"]
    assert (run / "final" / "model.safetensors").is_file()
    assert '"world_size": 2' in (run / "ckpt-0000006" / "trainer.json").read_text()
