"""The trainer: schedules against hand formulas, a short run that learns, NaN handling,
the YAML/flag config, and clear errors on bad input before any training."""
from __future__ import annotations

import json
import math

import pytest
import yaml
from _trainkit import MICRO, cli_args, micro_setup, read_metrics, train_in_process

from parscale.cli.main import main as cli_main
from parscale.errors import UserError
from parscale.train import NonFiniteLoss, TrainConfig, train
from parscale.train import convert as convert_mod
from parscale.train.checkpoint import latest_checkpoint, list_checkpoints
from parscale.train.schedule import lr_at


# ---------------------------------------------------------------- schedules
def test_cosine_schedule_matches_the_hand_formula():
    base, warm, total, floor = 2e-3, 10, 100, 0.1
    for s in range(total):
        got = lr_at(s, base_lr=base, warmup_steps=warm, total_steps=total, schedule="cosine", min_ratio=floor)
        if s < warm:
            want = base * (s + 1) / warm
        else:
            t = (s - warm) / (total - 1 - warm)
            want = base * (floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2)
        assert got == pytest.approx(want, rel=1e-12), s
    # anchors read off the formula by hand: peak right after warmup, floor at the last step,
    # and exactly halfway between them at the middle of the decay
    kw = dict(base_lr=1.0, warmup_steps=10, total_steps=101, schedule="cosine", min_ratio=0.1)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(55, **kw) == pytest.approx(0.55)
    assert lr_at(100, **kw) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_decays_linearly_to_the_floor():
    kw = dict(base_lr=1.0, warmup_steps=10, total_steps=100, schedule="wsd", min_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)          # warmup 1/10
    assert [lr_at(s, **kw) for s in range(10, 80)] == [1.0] * 70   # stable phase
    # the last 20% (20 steps) decay linearly: step 80 is 1/20 of the way, step 99 the floor
    assert lr_at(80, **kw) == pytest.approx(1 - 0.9 / 20)
    assert lr_at(89, **kw) == pytest.approx(1 - 0.9 * 10 / 20)
    assert lr_at(99, **kw) == pytest.approx(0.1)


# ---------------------------------------------------------------- a short run learns
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("short")
    opts = micro_setup(root)
    fields = dict(out=str(root / "run"), P=2, steps=24, **{**opts, "eval_every": 8, "save_every": 8})
    cfg = TrainConfig(**fields)
    final = train_in_process(**fields)
    return root, opts, cfg, final


def test_a_short_run_lowers_the_validation_loss(short_run):
    root, _, cfg, final = short_run
    records = read_metrics(cfg.run_dir)
    assert [r["step"] for r in records] == list(range(1, 25))
    for r in records:
        assert {"step", "tokens", "train_loss", "lr", "tokens_per_s"} <= set(r)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 3
    # an untrained model predicts about uniformly: ln(V) nats; training must beat that
    # clearly and keep improving from the first to the last evaluation
    assert val[-1] < val[0] < math.log(MICRO["vocab_size"])
    assert val[-1] < math.log(MICRO["vocab_size"]) - 0.5
    assert (cfg.run_dir / "loss.png").stat().st_size > 1000
    saved = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    assert saved["P"] == 2 and saved["steps"] == 24
    # the final model reloads with its streams and gives the logged held-out loss again
    from parscale.data.prepare import DataConfig, evaluate_loss, prepare_data
    from parscale.model.wrapper import ParScaleForCausalLM

    model = ParScaleForCausalLM.from_pretrained(final)
    assert model.parscale_config.n_streams == 2
    data = prepare_data(DataConfig.from_dict(saved["data"]), cache_dir=saved["cache_dir"])
    again = evaluate_loss(model, data.val, seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    assert again == pytest.approx(val[-1], abs=1e-5)
    assert (final / "tokenizer.json").is_file()
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["ckpt-0000016", "ckpt-0000024"]


def test_resuming_with_a_different_P_or_model_is_refused(short_run, capsys):
    _, _, cfg, _ = short_run
    assert cli_main(["train", "--resume", str(cfg.run_dir), "--P", "4"]) == 2
    err = capsys.readouterr().err
    assert "different P" in err and "P=2" in err
    other = cfg.run_dir.parent / "other.json"
    other.write_text(json.dumps({**MICRO, "hidden_size": 64}))
    assert cli_main(["train", "--resume", str(cfg.run_dir), "--model-config", str(other)]) == 2
    assert "different model_config" in capsys.readouterr().err
    # a config.yaml edited by hand is caught by the checkpoint itself
    saved = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    with pytest.raises(UserError, match="P=2 model but the run config says P=3"):
        train(TrainConfig.from_dict({**saved, "P": 3}), resume=True)


def test_resuming_with_fewer_steps_than_the_last_checkpoint_is_refused(short_run, capsys):
    """Otherwise a checkpoint named for step 10 would hold the model trained for 24 steps."""
    _, _, cfg, _ = short_run
    before = (cfg.run_dir / "config.yaml").read_text()
    assert cli_main(["train", "--resume", str(cfg.run_dir), "--steps", "10"]) == 2
    err = capsys.readouterr().err
    assert "ckpt-0000024 is at step 24, past --steps 10" in err and "--steps 24 or more" in err
    assert "Traceback" not in err
    assert (cfg.run_dir / "config.yaml").read_text() == before  # the run is untouched
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["ckpt-0000016", "ckpt-0000024"]


# ---------------------------------------------------------------- NaN stops the run
@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, what):
    """A NaN loss, or a finite loss with an infinite gradient, stops the run before the update."""
    opts = micro_setup(tmp_path)
    built = convert_mod.model_from_scratch

    def poisoned(*args, **kwargs):
        model = built(*args, **kwargs)
        calls = {"n": 0}

        def hook(module, inputs, output):
            if getattr(output, "loss", None) is None:
                return output  # evaluation calls carry no labels
            calls["n"] += 1
            if calls["n"] >= 6 and what == "loss":  # the 6th update's forward pass
                output.loss = output.loss * float("nan")
            elif calls["n"] == 6:  # the loss stays finite, its gradient does not
                output.loss.register_hook(lambda grad: grad * float("inf"))
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(convert_mod, "model_from_scratch", poisoned)
    cfg = TrainConfig(out=str(tmp_path / "run"), P=1, steps=12, **opts)
    with pytest.raises(NonFiniteLoss, match=rf"training {what} became \w+ at step 6\b") as info:
        train_in_process(**cfg.to_dict())
    assert "ckpt-0000004" in str(info.value)
    assert latest_checkpoint(cfg.run_dir).name == "ckpt-0000004"
    assert not (cfg.run_dir / "final").exists()
    assert [r["step"] for r in read_metrics(cfg.run_dir)] == [1, 2, 3, 4, 5]
    assert isinstance(info.value, UserError)  # so the CLI prints it without a traceback


# ---------------------------------------------------------------- config and bad input
def test_flags_override_the_yaml_file(tmp_path):
    from parscale.cli.train import resolve_config

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(
        {"preset": "tiny", "P": 4, "steps": 50, "lr": 1e-3, "data": {"vocab_size": 1024}}))
    cfg, resume = resolve_config(["--config", str(tmp_path / "run.yaml"), "--steps", "7",
                                  "--data-seed", "3", "--out", str(tmp_path / "r")])
    assert not resume
    assert (cfg.P, cfg.steps, cfg.lr) == (4, 7, 1e-3)
    assert (cfg.data.vocab_size, cfg.data.seed) == (1024, 3)
    assert cfg.warmup_steps == 1  # 5% of 7 steps, at least one


@pytest.mark.parametrize("case", ["unknown preset", "missing corpus", "empty corpus",
                                  "seq len above max", "streams without init", "prefix at P=2"])
def test_bad_input_is_a_clear_error_before_training(case, tmp_path, capsys):
    opts = micro_setup(tmp_path)
    run = tmp_path / "run"
    expect = {
        "unknown preset": (["--preset", "huge", "--out", str(run)], "invalid choice: 'huge'"),
        "missing corpus": (cli_args({**opts, "data": {**opts["data"], "files": [str(tmp_path / "nope.txt")]}})
                           + ["--out", str(run)], "nope.txt"),
        "empty corpus": (None, "empty"),
        "seq len above max": (cli_args({**opts, "seq_len": 128}) + ["--out", str(run)],
                              "above the model's maximum"),
        "streams without init": (["--train", "streams", "--out", str(run)], "--init-from"),
        "prefix at P=2": (["--P", "2", "--prefix-at-p1", "--out", str(run)], "--prefix-at-p1 gives a P=1 model"),
    }
    args, needle = expect[case]
    if case == "empty corpus":
        (tmp_path / "empty.txt").write_text("")
        args = cli_args({**opts, "data": {**opts["data"], "files": [str(tmp_path / "empty.txt")]}})
        args += ["--out", str(run)]
    try:
        code = cli_main(["train", *args])
    except SystemExit as exit_:  # argparse's own one-line error, which lists the choices
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err
    assert not run.exists()  # a first start that fails leaves no directory behind (no lock, no init.json)


def test_gradient_accumulation_sees_the_same_global_batch_and_evaluates_in_micro_batches(tmp_path, monkeypatch):
    # --grad-accum splits the update's batch into micro-batches; it must not change the data
    # or the math, so 2 x 2 rows and 1 x 4 rows give the same losses and gradient norms to
    # float rounding (the two half-batch gradients are summed in another order: ~1e-7 on a
    # loss near 5). Clipping is off, so a wrong loss scale shows in the norm (it doubles).
    # Evaluation forwards no more rows than a training micro-batch, or a model that fits
    # in memory only thanks to accumulation would run out of memory at the first evaluation.
    opts = micro_setup(tmp_path)
    built, rows = convert_mod.model_from_scratch, {}

    def recording(*args, **kwargs):
        model = built(*args, **kwargs)

        def hook(module, args, kwargs):
            kind = "train" if kwargs.get("labels") is not None else "eval"
            rows.setdefault(kind, set()).add(kwargs["input_ids"].shape[0])

        model.register_forward_pre_hook(hook, with_kwargs=True)
        return model

    monkeypatch.setattr(convert_mod, "model_from_scratch", recording)
    for name, accum in (("one", 1), ("two", 2)):
        rows.clear()
        train_in_process(out=str(tmp_path / name), P=2, steps=3, grad_accum=accum,
                         **{**opts, "eval_every": 0, "save_every": 0, "grad_clip": 0.0})
        assert rows["train"] == {4 // accum} and max(rows["eval"]) == 4 // accum, rows
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["train_loss"] for r in two] == pytest.approx([r["train_loss"] for r in one], abs=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], abs=1e-5)
