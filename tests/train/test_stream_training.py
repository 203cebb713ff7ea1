"""The trainer's stream options: a learning-rate multiplier for the stream parameters, the
stream-similarity penalty, the decorrelation loss, the reparameterised prefix (saved plain,
resumed exactly), and the stream diagnostics logged at every evaluation."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from _trainkit import micro_setup, read_metrics, train_in_process
from safetensors.torch import load_file
from test_resume import STEPS, _same_curve

from parscale.data.prepare import DataConfig, prepare_data
from parscale.errors import UserError
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import ParScaleForCausalLM, to_parscale
from parscale.train import TrainConfig
from parscale.train.convert import PREFIX_ENCODER_FILE, param_groups
from parscale.train.loop import penalised_loss


def test_param_groups_put_exactly_the_stream_parameters_in_their_own_groups(tiny_factory):
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 3))
    with_lora = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 3, stream_lora_rank=2))
    lora = {id(p) for n, p in with_lora.named_parameters() if "stream_lora" in n}
    assert len(lora) == 16 and lora <= {id(p) for g in param_groups(with_lora, 0.1, 3.0)[2:] for p in g["params"]}
    stream = {id(p) for _, p in model.stream_parameters()}
    every = {id(p) for p in model.parameters()}
    groups = param_groups(model, 0.1, stream_lr_mult=3.0)
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 3.0, 3.0]
    assert {id(p) for g in groups[2:] for p in g["params"]} == stream
    assert {id(p) for g in groups[:2] for p in g["params"]} == every - stream
    # the aggregation's matrices decay, the prefixes and biases do not
    decayed = {id(p) for p in groups[2]["params"]}
    assert decayed == {id(model.model.aggregate_layer[0].weight), id(model.model.aggregate_layer[2].weight)}
    # at 1 the layout is the two groups earlier runs' optimizer states hold
    plain = param_groups(model, 0.1)
    assert len(plain) == 2 and {id(p) for g in plain for p in g["params"]} == every


def test_penalty_adds_coef_times_the_positive_part_of_the_pairwise_cosine(tiny_factory):
    n_streams, coef = 3, 0.25
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(n_streams, 4), seed=1)
    ids = torch.randint(2, 97, (2, 6), generator=torch.Generator().manual_seed(0))

    def flip_stream_1(states):  # so that two of the three pairs have negative cosines
        return torch.cat([states[:2], -states[2:4], states[4:]])

    # the streams of a fresh model are ~0.99 alike; flipping one, before the aggregation sees it,
    # makes the positive part differ from the signed cosine
    pre = model.model.aggregate_layer.register_forward_pre_hook(lambda m, args: (flip_stream_1(args[0]),))
    try:
        loss, total = penalised_loss(model, model, ids, coef)
        with torch.no_grad():
            plain = model(input_ids=ids, labels=ids).loss
    finally:
        pre.remove()
    with torch.no_grad():  # the streams' final states from the backbone, then a loop over pairs in float64
        rows = model.model(inputs_embeds=model.get_input_embeddings()(ids).repeat(n_streams, 1, 1)).last_hidden_state
        states = flip_stream_1(rows.double()).view(n_streams, 2, 6, -1)
        cos = [F.cosine_similarity(states[i, b, s], states[j, b, s], dim=0)
               for i in range(n_streams) for j in range(i + 1, n_streams) for b in range(2) for s in range(6)]
        assert min(cos) < -0.5
        want = coef * float(torch.stack(cos).clamp(min=0).mean())
    assert loss.item() == pytest.approx(plain.item(), abs=1e-6)
    assert (total - loss).item() == pytest.approx(want, abs=1e-6)
    assert total.requires_grad  # the penalty is part of what is minimised
    off_loss, off_total = penalised_loss(model, model, ids, 0.0)
    assert off_total is off_loss


def _loop_cross_correlation(states: torch.Tensor, eps: float = 1e-5) -> float:
    """states: n b s h (float64); the mean over pairs and feature pairs of the squared
    correlation over the positions, by loops over the pairs and the features."""
    n_streams, dim = states.shape[0], states.shape[-1]
    flat = states.reshape(n_streams, -1, dim)  # n N h
    z = [[(col - col.mean()) / torch.sqrt(((col - col.mean()) ** 2).mean() + eps) for col in flat[n].T]
         for n in range(n_streams)]
    pairs = []
    for i in range(n_streams):
        for j in range(i + 1, n_streams):
            pairs.append(sum(float((zi * zj).mean()) ** 2 for zi in z[i] for zj in z[j]) / dim ** 2)
    return sum(pairs) / len(pairs)


def test_decorrelation_adds_its_weight_times_the_streams_squared_cross_correlation(tiny_factory):
    n_streams, coef, weight = 3, 0.25, 0.7
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(n_streams, 4), seed=1)
    ids = torch.randint(2, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the streams' final states from the backbone, then loops in float64
        rows = model.model(inputs_embeds=model.get_input_embeddings()(ids).repeat(n_streams, 1, 1)).last_hidden_state
        states = rows.double().view(n_streams, 2, 6, -1)  # n b s h
        plain = model(input_ids=ids, labels=ids).loss
        cos = [F.cosine_similarity(states[i, b, s], states[j, b, s], dim=0) for i in range(n_streams)
               for j in range(i + 1, n_streams) for b in range(2) for s in range(6)]
    want = _loop_cross_correlation(states)
    assert 0.0 < want < 1.0
    loss, total = penalised_loss(model, model, ids, 0.0, decorrelation=weight)
    assert loss.item() == pytest.approx(plain.item(), abs=1e-6)
    assert (total - loss).item() == pytest.approx(weight * want, abs=1e-6)
    (total - loss).backward()  # the term alone reaches the prefixes: it is part of what is minimised
    assert model.model.layers[0].self_attn.prefix_k.grad.abs().sum() > 0
    both_loss, both = penalised_loss(model, model, ids, coef, decorrelation=weight)  # the two terms add
    positive = float(torch.stack(cos).clamp(min=0).mean())
    assert (both - both_loss).item() == pytest.approx(weight * want + coef * positive, abs=1e-6)
    off_loss, off_total = penalised_loss(model, model, ids, 0.0, decorrelation=0.0)  # 0: the old loss itself
    assert off_total is off_loss and off_loss.item() == pytest.approx(plain.item(), abs=1e-6)


def test_bad_stream_options_get_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="--stream-lr-mult must be positive"):
        TrainConfig(out=str(tmp_path), P=2, stream_lr_mult=0.0)
    with pytest.raises(UserError, match="--stream-similarity-penalty compares streams"):
        TrainConfig(out=str(tmp_path), stream_similarity_penalty=0.1)
    with pytest.raises(UserError, match="--prefix-mlp-hidden produces prefixes"):
        TrainConfig(out=str(tmp_path), prefix_mlp_hidden=8)
    with pytest.raises(UserError, match="--prefix-init-std must be positive"):
        TrainConfig(out=str(tmp_path), P=2, prefix_init_std=0.0)
    with pytest.raises(UserError, match="--stream-decorrelation compares streams"):
        TrainConfig(out=str(tmp_path), stream_decorrelation=0.1)
    with pytest.raises(UserError, match="--stream-decorrelation must be >= 0"):
        TrainConfig(out=str(tmp_path), P=2, stream_decorrelation=-0.1)
    with pytest.raises(UserError, match="option stream_decorrelation must be float"):
        TrainConfig(out=str(tmp_path), P=2, stream_decorrelation="high")
    with pytest.raises(UserError, match="--stream-lora-rank gives each stream its own adapter"):
        TrainConfig(out=str(tmp_path), stream_lora_rank=4)
    with pytest.raises(UserError, match="--stream-lora-rank must be >= 0"):
        TrainConfig(out=str(tmp_path), P=2, stream_lora_rank=-1)
    with pytest.raises(UserError, match="option stream_lora_rank must be int"):
        TrainConfig(out=str(tmp_path), P=2, stream_lora_rank=2.5)
    with pytest.raises(UserError, match="add --stream-lora-rank R"):
        TrainConfig(out=str(tmp_path), P=2, stream_lora_alpha=8.0)
    with pytest.raises(UserError, match="--stream-lora-alpha must be positive"):
        TrainConfig(out=str(tmp_path), P=2, stream_lora_rank=4, stream_lora_alpha=0.0)
    assert TrainConfig(out=str(tmp_path), P=1, prefix_at_p1=True, stream_lora_rank=4).stream_lora_rank == 4


def _hand_cosine(step: int, base: float, warmup: int, total: int, floor: float = 0.1) -> float:
    t = (step - warmup) / (total - 1 - warmup)
    return base * (floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2)


def test_a_run_with_every_stream_option_logs_diagnostics_saves_plain_and_resumes_exactly(tmp_path):
    opts = micro_setup(tmp_path)
    opts.update(P=2, steps=STEPS, eval_every=4, save_every=4, keep_last=3, prefix_tokens=4, prefix_init_std=0.05,
                prefix_mlp_hidden=8, stream_lr_mult=3.0, stream_similarity_penalty=0.1, stream_decorrelation=0.1,
                stream_lora_rank=4, stream_lora_alpha=8.0)
    prepare_data(DataConfig.from_dict(opts["data"]), cache_dir=opts["cache_dir"])
    reference = tmp_path / "reference"
    train_in_process(out=str(reference), **opts)

    # the rate of every group at update 8 (index 7): the hand cosine (1 warm-up step), x3 for the streams
    groups = json.loads((reference / "ckpt-0000008" / "optimizer.json").read_text())["param_groups"]
    want = _hand_cosine(7, 3e-3, warmup=1, total=STEPS)
    assert [g["lr"] for g in groups] == pytest.approx([want, want, 3 * want, 3 * want], rel=1e-12)

    # diagnostics at every evaluation; the last equals a fresh measurement of the saved model
    records = read_metrics(reference)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 10]
    for r in evals:
        assert 0.5 <= r["top_weight"] <= 1 and 0 <= r["weight_entropy"] <= 1 and -1 <= r["stream_cosine"] <= 1
    from parscale.model.diagnostics import stream_diagnostics

    data = prepare_data(DataConfig.from_dict(opts["data"]), cache_dir=opts["cache_dir"])
    x = torch.as_tensor(data.val[: 4 * 32].astype("int64")).view(4, 32)  # batch 4 x seq 32
    final = ParScaleForCausalLM.from_pretrained(reference / "final")
    again = stream_diagnostics(final, x)
    for key in ("stream_cosine", "top_weight", "weight_entropy"):
        assert evals[-1][key] == pytest.approx(again[key], abs=1e-5), key

    # the final model is a plain ParScale model; checkpoints carry the MLP beside it
    saved = load_file(str(reference / "final" / "model.safetensors"))
    assert "model.layers.0.self_attn.prefix_k" in saved and not any("prefix_encoder" in k for k in saved)
    assert saved["model.layers.1.self_attn.v_proj.stream_lora_B"].abs().max() > 0  # the adapters learned
    assert final.parscale_config.stream_lora_rank == 4 and final.parscale_config.stream_lora_scale == 2.0
    assert (reference / "ckpt-0000010" / PREFIX_ENCODER_FILE).is_file()

    # resumed from the reference's own checkpoint of step 4 (what a run stopped in update 5-8
    # keeps; test_resume covers the stopping itself): the same curve and the same weights
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for later in ("ckpt-0000008", "ckpt-0000010", "final"):
        shutil.rmtree(run / later)
    (run / "latest").write_text("ckpt-0000004\n")
    train_in_process(out=str(run), **opts, resume=True)
    _same_curve(run, reference)
    for g, w in zip(read_metrics(run), records):
        for key in ("stream_cosine", "top_weight", "weight_entropy"):
            assert (key in g) == (key in w) and g.get(key) == pytest.approx(w.get(key), abs=1e-6)


def test_a_run_with_the_decorrelation_loss_trains_and_logs_the_correlation(tmp_path):
    """Three updates of P = 2 with and without the term, from the same start: both finish, the
    term changes the updates, and every evaluation logs the streams' cross-correlation."""
    opts = micro_setup(tmp_path)
    opts.update(P=2, steps=3, eval_every=3, save_every=3, prefix_tokens=4)
    finals = {}
    for weight in (0.0, 1.0):
        out = tmp_path / f"w{weight}"
        finals[weight] = train_in_process(out=str(out), stream_decorrelation=weight, **opts)
        evals = [r for r in read_metrics(out) if "val_loss" in r]
        assert [r["step"] for r in evals] == [3] and 0.0 < evals[0]["stream_correlation"] <= 1.0
        assert all(math.isfinite(r["train_loss"]) for r in read_metrics(out))
    plain, decorrelated = (load_file(str(finals[w] / "model.safetensors")) for w in (0.0, 1.0))
    key = "model.layers.0.self_attn.prefix_k"
    assert not torch.equal(plain[key], decorrelated[key])


def test_the_diversity_options_come_from_flags_and_from_yaml(tmp_path):
    from parscale.cli.train import resolve_config

    (tmp_path / "run.yaml").write_text("P: 2\nstream_lora_rank: 8\nstream_lora_alpha: 16\nstream_decorrelation: 0.2\n")
    cfg, _ = resolve_config(["--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "a")])
    assert (cfg.stream_lora_rank, cfg.stream_lora_alpha, cfg.stream_decorrelation) == (8, 16, 0.2)
    cfg, _ = resolve_config(["--P", "4", "--stream-lora-rank", "2", "--stream-decorrelation", "0.5",
                             "--out", str(tmp_path / "b")])
    assert (cfg.stream_lora_rank, cfg.stream_lora_alpha, cfg.stream_decorrelation) == (2, None, 0.5)
