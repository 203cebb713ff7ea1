"""Nothing is lost: a run SIGKILLed in the middle of an update, and then again in the middle
of writing a checkpoint, continues with `--resume` and logs exactly what an uninterrupted
run logs. The model has dropout, so the resumed run matches only if the RNG states are
restored too, not just the weights, the optimizer and the data position.

The interrupted run is a real `python -m parscale train` subprocess and each kill a real
SIGKILL at a chosen point (fault-injection environment variables), so no cleanup code runs.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from _trainkit import MICRO, cli_args, micro_setup, read_metrics, run_train, train_in_process
from safetensors.torch import load_file

from parscale.data.prepare import DataConfig, prepare_data
from parscale.train.checkpoint import KILL_ENV, list_checkpoints
from parscale.train.loop import KILL_STEP_ENV

STEPS = 10
# On CPU, with one thread, the same operations in the same order give the same bits; 1e-6
# is the requirement, and a resume that lost any state (optimizer moments, data
# position, schedule) moves the next loss by 1e-3 or more.
TOL = 1e-6


def _same_curve(run: Path, reference: Path) -> None:
    got, want = read_metrics(run), read_metrics(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        for key in ("train_loss", "lr", "tokens", "grad_norm"):
            assert g[key] == pytest.approx(w[key], abs=TOL), (g["step"], key)
        assert ("val_loss" in g) == ("val_loss" in w)
        if "val_loss" in w:
            assert g["val_loss"] == pytest.approx(w["val_loss"], abs=TOL), g["step"]
    a = load_file(str(run / "final" / "model.safetensors"))
    b = load_file(str(reference / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= TOL, name


@pytest.mark.slow
def test_a_run_killed_mid_step_and_mid_checkpoint_resumes_exactly(tmp_path):
    opts = micro_setup(tmp_path)
    with_dropout = tmp_path / "micro-dropout.json"
    with_dropout.write_text(json.dumps({**MICRO, "attention_dropout": 0.2}))
    opts.update(P=2, steps=STEPS, eval_every=4, save_every=3, keep_last=2, model_config=str(with_dropout))
    prepare_data(DataConfig.from_dict(opts["data"]), cache_dir=opts["cache_dir"])  # shared by every run
    reference = tmp_path / "reference"
    train_in_process(out=str(reference), **opts)
    run = tmp_path / "interrupted"

    # 1. killed in the middle of update 5 (after its backward pass, before the optimizer step)
    killed = run_train(cli_args(opts) + ["--out", str(run)], **{KILL_STEP_ENV: "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-0000003"]

    # 2. resumed from step 3, then killed while writing the checkpoint of step 9
    killed = run_train(["--resume", str(run)], **{KILL_ENV: "9"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    half_written = list(run.glob(".tmp-*"))
    assert half_written and (half_written[0] / "model").is_dir()  # weights written, the rest not
    assert (run / "latest").read_text().strip() == "ckpt-0000006"
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-0000003", "ckpt-0000006"]

    # 3. resumed from step 6 (the last complete checkpoint) to the end
    resumed = run_train(["--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list(run.glob(".tmp-*"))  # the half-written checkpoint was cleaned away
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-0000009", "ckpt-0000010"]
    _same_curve(run, reference)


# ---------------------------------------------------------------- extending a finished run
@pytest.mark.slow
def test_extending_a_finished_run_keeps_its_previous_final_model(tmp_path, caplog):
    """Runs (`--init-from`) and stream adapters were trained on the finished run's final/: an
    extension renames it to final-step<N>/ instead of overwriting it, and says so."""
    import logging

    from parscale.cli.main import main as cli_main

    opts = micro_setup(tmp_path)
    opts.update(P=2, steps=4, eval_every=0, save_every=0)
    run = tmp_path / "run"
    train_in_process(out=str(run), **opts)
    before = {p.name: p.read_bytes() for p in (run / "final").iterdir()}
    (run / "final-streams").mkdir()  # stands for the adapter a --train streams run writes beside final/
    (run / "final-streams" / "adapter_config.json").write_text("{}")
    with caplog.at_level(logging.INFO, logger="parscale"):
        assert cli_main(["train", "--resume", str(run), "--steps", "6"]) == 0
    assert f"{run} finished at step 4; extending it to step 6" in caplog.text
    assert f"kept the previous final model as {run / 'final-step4'}" in caplog.text
    assert {p.name: p.read_bytes() for p in (run / "final-step4").iterdir()} == before  # byte for byte
    assert (run / "final-streams-step4" / "adapter_config.json").read_text() == "{}"
    new = load_file(str(run / "final" / "model.safetensors"))
    old = load_file(str(run / "final-step4" / "model.safetensors"))
    assert any((new[k] - old[k]).abs().max() > 0 for k in new)  # two more updates changed the model
    assert json.loads((run / "final" / "data_order.json").read_text())["rows"] == 6 * opts["batch_size"]
    # resuming the finished run again, with nothing left to train, keeps no other copy
    assert cli_main(["train", "--resume", str(run)]) == 0
    assert sorted(p.name for p in run.glob("final*")) == ["final", "final-step4", "final-streams-step4"]


def test_the_step_of_a_final_model_is_read_from_its_data_order_record(tmp_path):
    from types import SimpleNamespace

    from parscale.train.data_order import RECORD, recorded_step

    cfg = SimpleNamespace(order_start=10, batch_size=4)
    assert recorded_step(tmp_path, cfg) is None  # no record: a model not written by this trainer
    (tmp_path / RECORD).write_text(json.dumps({"rows": 10 + 4 * 7}))
    assert recorded_step(tmp_path, cfg) == 7  # rows = order_start + steps x batch_size
    (tmp_path / RECORD).write_text(json.dumps({"rows": 10 + 4 * 7 + 1}))
    assert recorded_step(tmp_path, cfg) is None  # a record of another batch size or start
