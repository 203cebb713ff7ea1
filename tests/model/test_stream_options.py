"""The prefix options the mini-study tries: the initialisation scale and the reparameterised
(MLP-produced) prefix, which must save as a plain ParScale model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from parscale.errors import UserError
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import ParScaleForCausalLM, to_parscale


def _ids(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(2, 97, (batch, length), generator=torch.Generator().manual_seed(3))


def _all_prefixes(model) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for a in model.attention_modules() for t in (a.prefix_k, a.prefix_v)])


@pytest.mark.parametrize("std", [0.002, 0.2])
def test_prefix_init_std_is_the_sample_std(tiny_factory, std):
    # 2 layers x (K, V) x P=2 x 2 kv heads x 256 slots x 8 dims = 32768 draws: the sample std of
    # N(0, s) is within about 1/sqrt(2n) = 0.4% of s, so 3% is a wide margin.
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 256, prefix_init_std=std))
    draws = _all_prefixes(model)
    assert draws.numel() == 32768
    assert draws.std().item() == pytest.approx(std, rel=0.03)
    assert draws.mean().abs().item() < 5 * std / draws.numel() ** 0.5


def test_default_init_is_unchanged(tiny_factory):
    """The default draws are the ones every existing run made: N(0, 0.02) from the seed's generator."""
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 3), seed=4)
    gen = torch.Generator().manual_seed(4)
    for attention in model.attention_modules():
        for param in (attention.prefix_k, attention.prefix_v):
            assert torch.equal(param.detach(), torch.randn(param.shape, generator=gen) * 0.02)


def test_bad_options_get_one_clear_error():
    with pytest.raises(UserError, match="prefix_init_std must be a positive"):
        ParScaleConfig(2, prefix_init_std=0.0)
    with pytest.raises(UserError, match="prefix_mlp_hidden must be >= 0"):
        ParScaleConfig(2, prefix_mlp_hidden=-1)
    with pytest.raises(UserError, match="plain P = 1 model has none"):
        ParScaleConfig(1, prefix_mlp_hidden=8)
    assert ParScaleConfig(2).to_dict() == {"n_streams": 2, "n_prefix_tokens": 48, "attn_smooth": 0.01}


def _mlp_model(tiny_factory, hidden=16, n_prefix=3, seed=5, std=0.02):
    return to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, n_prefix, prefix_mlp_hidden=hidden,
                                                             prefix_init_std=std), seed=seed)


def _train_a_little(model, steps=3):
    """A few updates, so that the saved prefixes are not the initial ones."""
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.stream_parameters()], lr=1e-2)
    for _ in range(steps):
        model(_ids(), labels=_ids()).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_mlp_prefix_produces_the_released_layout(tiny_factory):
    """Each layer's prefixes are the MLP of the embedding, recomputed here by hand and indexed
    [stream*T + slot, ((layer*2 + k_or_v)*kv + head)*d + dim]."""
    model = _mlp_model(tiny_factory, std=0.05)
    enc = model.prefix_encoder
    flat = torch.tanh(enc.embedding @ enc.mlp[0].weight.T + enc.mlp[0].bias) @ enc.mlp[2].weight.T + enc.mlp[2].bias
    n_streams, n_prefix, n_kv, dim = 2, 3, 2, 8
    with torch.no_grad():
        model(_ids())
    for layer, attention in enumerate(model.attention_modules()):
        for which, got in enumerate((attention.prefix_k, attention.prefix_v)):
            assert got.shape == (n_streams, n_kv, n_prefix, dim)
            for p in range(n_streams):
                for h in range(n_kv):
                    for t in range(n_prefix):
                        col = ((layer * 2 + which) * n_kv + h) * dim
                        assert (got[p, h, t] - flat[p * n_prefix + t, col:col + dim]).abs().max() < 1e-6
    # initialised at the direct prefixes' scale, and the two streams differ
    assert flat.std().item() == pytest.approx(0.05, rel=1e-4)
    assert not torch.allclose(model.attention_modules()[0].prefix_k[0], model.attention_modules()[0].prefix_k[1])


def test_mlp_prefix_trains_the_encoder_and_not_direct_prefixes(tiny_factory):
    model = _mlp_model(tiny_factory)
    names = [n for n, _ in model.stream_parameters()]
    assert any(n.startswith("prefix_encoder.") for n in names)
    assert not any(n.endswith(("prefix_k", "prefix_v")) for n, _ in model.named_parameters())
    model.freeze_backbone()
    model.train()
    model(_ids(), labels=_ids()).loss.backward()
    assert model.prefix_encoder.embedding.grad.abs().max() > 0
    assert model.prefix_encoder.mlp[0].weight.grad.abs().max() > 0


def test_mlp_prefix_saves_as_a_plain_model_with_identical_logits(tiny_factory, tmp_path):
    model = _train_a_little(_mlp_model(tiny_factory))
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert not any(k.startswith("prefix_encoder") for k in saved)
    assert saved["model.layers.1.self_attn.prefix_v"].shape == (2, 2, 3, 8)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["parscale_n"] == 2 and not any("mlp" in k for k in config)
    reloaded = ParScaleForCausalLM.from_pretrained(tmp_path)
    assert reloaded.prefix_encoder is None and reloaded.parscale_config.prefix_mlp_hidden == 0
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, want)
    # merging in place gives the same plain model
    model.merge_prefix_encoder()
    assert model.prefix_encoder is None
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_stream_sets_refuse_an_unmerged_encoder(tiny_factory, tmp_path):
    model = _mlp_model(tiny_factory)
    with pytest.raises(UserError, match="merge_prefix_encoder"):
        model.save_streams(tmp_path / "adapter")
    model.merge_prefix_encoder().save_streams(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_merge_prefix_encoder_installs_the_materialised_prefixes(tiny_factory, tmp_path):
    """Merging turns what `materialised_prefixes` gives into the model's own prefix parameters:
    the same tensors under the same keys, trainable, the same logits, and a saved file (and
    config) of a plain model; with no encoder there is nothing to merge."""
    model = _train_a_little(_mlp_model(tiny_factory))
    ids = _ids()
    with torch.no_grad():
        want_logits = model(ids).logits
    want = {key: tensor.clone() for key, tensor in model.materialised_prefixes().items()}
    assert sorted(want) == sorted(f"model.layers.{i}.self_attn.prefix_{kv}" for i in range(2) for kv in "kv")
    model.merge_prefix_encoder()
    assert model.prefix_encoder is None and model.parscale_config.prefix_mlp_hidden == 0
    params = dict(model.named_parameters())
    assert not any(key.startswith("prefix_encoder") for key in model.state_dict())
    for key, tensor in want.items():
        assert isinstance(params[key], torch.nn.Parameter) and params[key].requires_grad
        assert torch.equal(params[key].detach(), tensor)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want_logits)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert not any(key.startswith("prefix_encoder") for key in saved)
    for key, tensor in want.items():
        assert torch.equal(saved[key], tensor)
    assert not any("mlp" in key for key in json.loads((tmp_path / "config.json").read_text()))
    with pytest.raises(UserError, match="no prefix encoder"):
        model.merge_prefix_encoder()
