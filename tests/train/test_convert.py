"""Two-stage training: converting a trained P=1 model to P streams must not wreck it (held-out
loss within 2%), must break the symmetry between streams, and `--train streams` must leave
the backbone bitwise untouched while the prefixes learn."""
from __future__ import annotations

import pytest
import torch
from _trainkit import micro_setup, read_metrics, train_in_process
from transformers import AutoModelForCausalLM

from parscale.model.config import ParScaleConfig
from parscale.data.prepare import DataConfig, evaluate_loss, prepare_data
from parscale.model.wrapper import ParScaleForCausalLM, to_parscale
from parscale.train import TrainConfig


@pytest.fixture(scope="module")
def trained_p1(tmp_path_factory):
    """A P=1 micro model trained for 40 steps, as `parscale train` saves it."""
    root = tmp_path_factory.mktemp("convert")
    opts = micro_setup(root)
    final = train_in_process(out=str(root / "p1"), P=1, steps=40, **{**opts, "eval_every": 0, "save_every": 0})
    data = prepare_data(DataConfig.from_dict(opts["data"]), cache_dir=opts["cache_dir"])
    return root, opts, final, data


def _plain(final_dir):
    """The trained P=1 model as a stock transformers model (the independent reference)."""
    p1 = ParScaleForCausalLM.from_pretrained(final_dir)
    plain = AutoModelForCausalLM.from_config(p1.config)
    plain.load_state_dict(p1.state_dict())
    return plain.eval()


def _stream_states(model, x, P):
    """Final hidden states per stream: [P, B, L, H] from the backbone's (n b) s h output."""
    seen = {}

    def grab(module, inputs, output):
        seen["h"] = output.last_hidden_state

    handle = model.model.register_forward_hook(grab)
    model(input_ids=x)
    handle.remove()
    h = seen["h"]
    return h.view(P, x.shape[0], *h.shape[1:])  # n b s h


def test_conversion_keeps_the_loss_within_2_percent_and_breaks_symmetry(trained_p1):
    root, opts, final, data = trained_p1
    fields = dict(out=str(root / "p2-full"), init_from=str(final), P=2, steps=2,
                  **{**opts, "model_config": None, "eval_every": 0, "save_every": 0})
    cfg = TrainConfig(**fields)
    train_in_process(**fields)
    step0 = read_metrics(cfg.run_dir)[0]
    assert step0["step"] == 0 and "val_loss" in step0 and "train_loss" in step0
    # the P=1 loss, recomputed independently on the stock transformers model
    plain = _plain(final)
    p1_loss = evaluate_loss(plain, data.val, seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    assert step0["base_val_loss"] == pytest.approx(p1_loss, rel=1e-6)
    assert step0["val_loss"] / p1_loss - 1 < 0.02  # the required 2% bound
    # the logged converted loss is the one of the documented initialisation
    converted = to_parscale(_plain(final), ParScaleConfig(n_streams=2), seed=cfg.seed).eval()
    assert evaluate_loss(converted, data.val, seq_len=cfg.seq_len, batch_size=cfg.batch_size) == \
        pytest.approx(step0["val_loss"], rel=1e-6)
    # symmetry: the two streams' final hidden states differ, and so do their prefix gradients
    x = torch.as_tensor(data.val[:64].astype("int64")).view(2, 32)
    with torch.no_grad():
        h = _stream_states(converted, x, 2)
    assert (h[0] - h[1]).abs().max().item() > 1e-4
    converted.train()
    converted(input_ids=x, labels=x).loss.backward()
    grad = converted.model.layers[0].self_attn.prefix_k.grad  # [P, kv, T, d]
    assert not torch.allclose(grad[0], grad[1])
    # control: with identical (zero) prefixes the same measurement finds identical streams,
    # so the check above can tell symmetric streams from broken symmetry
    sym = to_parscale(_plain(final), ParScaleConfig(n_streams=2), seed=0).eval()
    with torch.no_grad():
        for name, p in sym.named_parameters():
            if "prefix" in name:
                p.zero_()
        h_sym = _stream_states(sym, x, 2)
    assert (h_sym[0] - h_sym[1]).abs().max().item() < 1e-6


def test_streams_mode_freezes_the_backbone_and_trains_the_prefixes(trained_p1, capsys, caplog):
    root, opts, final, data = trained_p1
    fields = dict(out=str(root / "p2-streams"), init_from=str(final), P=2, steps=4, train="streams",
                  **{**opts, "model_config": None, "lr": 1e-2, "eval_every": 0, "save_every": 0})
    cfg = TrainConfig(**fields)
    with caplog.at_level("INFO", logger="parscale"):
        out_dir = train_in_process(**fields)
    assert "trainable params:" in capsys.readouterr().out  # the PEFT-style report
    # the last line names both results: the full model and the adapter for the backbone
    assert any(str(cfg.run_dir / "final") in r.getMessage() and str(cfg.run_dir / "final-streams") in r.getMessage()
               for r in caplog.records)
    before = to_parscale(_plain(final), ParScaleConfig(n_streams=2), seed=cfg.seed)
    after = ParScaleForCausalLM.from_pretrained(out_dir)
    start, end = before.state_dict(), after.state_dict()
    assert start.keys() == end.keys()
    streams = [k for k in start if "prefix" in k or "aggregate_layer" in k]
    backbone = [k for k in start if k not in streams]
    assert streams and backbone
    for k in backbone:
        assert torch.equal(start[k], end[k]), k  # bitwise unchanged
    moved = [k for k in streams if "prefix" in k and not torch.equal(start[k], end[k])]
    assert len(moved) == len([k for k in streams if "prefix" in k])  # every prefix learned
    records = read_metrics(cfg.run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    # RUN_DIR/final-streams/ is the adapter: on the P = 1 model it gives final/'s logits exactly
    base = ParScaleForCausalLM.from_pretrained(final)
    base.set_streams(base.load_streams(cfg.run_dir / "final-streams"))
    x = torch.randint(0, after.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(base(x).logits, after(x).logits)
    assert sorted(p.name for p in (cfg.run_dir / "final-streams").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]


def test_stage_two_continues_the_data_order_where_stage_one_stopped(trained_p1, monkeypatch):
    """Stage 2 trains on the batches an uninterrupted stage 1 would have seen next (steps 40,
    41, ... of its order), not on stage 1's first batches again; the start is kept in each
    checkpoint for --resume, and the end passed on in final/data_order.json."""
    import yaml

    from parscale.data.batches import batch_at as pure_batch_at
    from parscale.train import loop

    root, opts, final, data = trained_p1
    seen = []

    def recording(*args, **kwargs):
        x = pure_batch_at(*args, **kwargs)
        seen.append(x)
        return x

    monkeypatch.setattr(loop, "batch_at", recording)
    fields = dict(out=str(root / "p2-order"), init_from=str(final), P=2, steps=2,
                  **{**opts, "model_config": None, "eval_every": 0, "save_every": 0})
    cfg = TrainConfig(**fields)
    train_in_process(**fields)
    # independent: the pure batch function at the steps after stage 1's 40 (batch 4, seed 0)
    after = [pure_batch_at(data.train, step=s, batch_size=4, seq_len=32, seed=0) for s in (40, 41)]
    first = [pure_batch_at(data.train, step=s, batch_size=4, seq_len=32, seed=0) for s in (0, 1)]
    assert torch.equal(seen[0], after[0])  # the step-0 training loss is measured on the next batch
    assert torch.equal(seen[1], after[0]) and torch.equal(seen[2], after[1])
    assert not torch.equal(seen[1], first[0]) and not torch.equal(seen[2], first[1])
    import json

    assert yaml.safe_load((cfg.run_dir / "config.yaml").read_text())["order_start"] is None  # as given
    assert json.loads((cfg.run_dir / "ckpt-0000002" / "trainer.json").read_text())["order_start"] == 40 * 4

    record = json.loads((cfg.run_dir / "final" / "data_order.json").read_text())
    assert record["rows"] == 42 * 4 and record["seq_len"] == 32


def test_the_start_of_the_data_order_follows_the_documented_rule(tmp_path, caplog):
    """An explicit --order-start wins; then a resumed run's checkpoint; then a matching
    record of --init-from; a record of another order gives 0 with a warning naming why."""
    import json
    import logging
    from types import SimpleNamespace

    import numpy as np

    from parscale.train import data_order

    data = SimpleNamespace(train=np.arange(50_000, dtype=np.uint16))
    source = tmp_path / "source"
    source.mkdir()
    stage1 = SimpleNamespace(order_start=None, init_from=None, seq_len=32, seed=0, steps=10, batch_size=4)
    data_order.write_record(source, stage1, data)
    cfg = SimpleNamespace(order_start=None, init_from=str(source), seq_len=32, seed=0, data=SimpleNamespace(format="text"))
    assert data_order.start_row(cfg, data) == 40
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "trainer.json").write_text(json.dumps({"step": 3, "order_start": 12}))
    assert data_order.start_row(cfg, data, ckpt) == 12  # resume keeps what the run started with
    assert data_order.start_row(SimpleNamespace(**{**vars(cfg), "order_start": 7}), data, ckpt) == 7
    with caplog.at_level(logging.WARNING):
        assert data_order.start_row(SimpleNamespace(**{**vars(cfg), "seq_len": 64}), data) == 0
        other = SimpleNamespace(train=np.arange(1, 50_001, dtype=np.uint16))
        assert data_order.start_row(cfg, other) == 0
    assert "seq_len differ" in caplog.text and "train_fingerprint differ" in caplog.text
    assert data_order.start_row(SimpleNamespace(**{**vars(cfg), "init_from": str(tmp_path)}), data) == 0  # no record


def test_streams_mode_trains_the_stream_adapters_and_saves_them_with_the_streams(trained_p1):
    """--stream-lora-rank with the backbone frozen: the adapters learn (A once B has moved), the
    backbone stays bitwise the P=1 model's, and final-streams/ carries the adapters."""
    root, opts, final, data = trained_p1
    fields = dict(out=str(root / "p2-lora"), init_from=str(final), P=2, steps=3, train="streams", stream_lora_rank=4,
                  **{**opts, "model_config": None, "lr": 1e-2, "eval_every": 0, "save_every": 0})
    cfg = TrainConfig(**fields)
    out_dir = train_in_process(**fields)
    before = to_parscale(_plain(final), ParScaleConfig(n_streams=2, stream_lora_rank=4), seed=cfg.seed)
    after = ParScaleForCausalLM.from_pretrained(out_dir)
    start, end = before.state_dict(), after.state_dict()
    assert start.keys() == end.keys()
    lora = [k for k in start if "stream_lora" in k]
    assert len(lora) == 2 * 4 * 2  # layers x q, k, v, o x (A, B)
    assert all(not torch.equal(start[k], end[k]) for k in lora)
    assert all(torch.equal(start[k], end[k]) for k in start if not any(m in k for m in ("prefix", "aggregate", "lora")))
    base = ParScaleForCausalLM.from_pretrained(final)
    base.set_streams(base.load_streams(cfg.run_dir / "final-streams"))
    x = torch.randint(0, after.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(base(x).logits, after(x).logits)
