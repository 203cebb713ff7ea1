"""Data parallel under torchrun: 2 CPU processes (gloo), with DDP or FSDP, train exactly what
1 process trains with the same global batch, so the logged losses agree to float tolerance;
and an FSDP run killed mid-update resumes (its sharded optimizer state restored) on that
same curve."""
from __future__ import annotations

import random

import pytest
import torch
from _chatkit import NUMBERS, chat_run_options, write_jsonl
from safetensors.torch import load_file
from _trainkit import cli_args, micro_setup, read_metrics, torchrun, train_in_process

from parscale.data.prepare import DataConfig, batch_at, prepare_data
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
    killed = torchrun([*cli_args({**opts, "fsdp": True}), "--out", str(run)], **{KILL_STEP_ENV: "5"})
    assert killed.returncode != 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]  # checkpoint at 3, killed in update 5
    resumed = torchrun(["--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_losses(read_metrics(root / "one"), read_metrics(run))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(one_process, mode):
    root, opts = one_process
    run = root / mode
    two = torchrun([*cli_args({**opts, "fsdp": mode == "fsdp"}), "--out", str(run)])
    assert two.returncode == 0, two.stderr[-3000:]
    _same_losses(read_metrics(root / "one"), read_metrics(run))
    assert (run / "final" / "model.safetensors").is_file()
    assert '"world_size": 2' in (run / "ckpt-0000006" / "trainer.json").read_text()


def lopsided(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """Conversations that alternate a long user turn and a one-word reply with a one-digit
    question and a long reply, so rows of 32 tokens score very different numbers of tokens."""
    rng, out = random.Random(seed), []
    for i in range(n):
        digits = [rng.randrange(10) for _ in range(16)]
        if i % 2:
            out.append([("user", " ".join(map(str, digits))), ("assistant", NUMBERS[digits[0]])])
        else:
            out.append([("user", str(digits[0])), ("assistant", " ".join(NUMBERS[d] for d in digits[:10]))])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_on_chat_data_make_the_update_of_one_process(tmp_path, mode):
    """Assistant-only masks score a different number of tokens on each rank, yet the update must
    be sum NLL / sum scored tokens, as on one process: two processes with two micro-batches each
    give the parameters that one process gives after one update of the same global batch."""
    opts, _, _ = chat_run_options(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", lopsided(16, seed=1))
    # No clipping and no decay: the parameters move by the Adam step of the gradient alone.
    opts.update(P=2, steps=1, batch_size=8, lr=1e-2, weight_decay=0.0, grad_clip=0.0, eval_every=0, save_every=0)
    data = prepare_data(DataConfig.from_dict(opts["data"]), cache_dir=opts["cache_dir"])  # built once, read by all
    # The tokens each rank of the two-process run scores (its 2 micro-batches of 2 rows; the
    # model shifts the labels, so a row's first token is never a target): they must differ.
    scored = [sum(int(batch_at(data.train_mask, step=m, batch_size=4, seq_len=opts["seq_len"], rank=r,
                               world_size=2)[:, 1:].sum()) for m in range(2)) for r in range(2)]
    assert abs(scored[0] - scored[1]) > 0.2 * sum(scored), scored  # 53 and 91
    train_in_process(out=str(tmp_path / "one"), **opts)
    two = torchrun([*cli_args({**opts, "grad_accum": 2, "fsdp": mode == "fsdp"}), "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    (one_record,), (two_record,) = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    # Float32 sums in another order: ~1e-7 relative. The mean of the two ranks' own means differs
    # from the global mean by a share of (scored[0] - scored[1]) / sum(scored), percents here.
    assert two_record["train_loss"] == pytest.approx(one_record["train_loss"], rel=1e-5)
    assert two_record["grad_norm"] == pytest.approx(one_record["grad_norm"], rel=1e-5)
    # The gradient itself: Adam's first moment after one step is (1 - beta1) x the gradient.
    moments = [load_file(str(tmp_path / run / "ckpt-0000001" / "optimizer.safetensors")) for run in ("one", "two")]
    first = sorted(k for k in moments[0] if k.endswith("/exp_avg"))
    assert first and first == sorted(k for k in moments[1] if k.endswith("/exp_avg"))
    for key in first:
        torch.testing.assert_close(moments[1][key], moments[0][key], rtol=1e-4, atol=1e-9, msg=key)
    one, two = (load_file(str(tmp_path / run / "final" / "model.safetensors")) for run in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:
        # A first Adam step moves a weight by lr x g / (|g| + 1e-8): lr = 1e-2 x the sign of its
        # gradient, except where |g| is near 1e-8 and summation order moves the fraction (seen:
        # 1.2e-6 once). The mean of the ranks' means flips signs: thousands of weights off by 2e-2.
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
