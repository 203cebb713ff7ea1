"""Stream adapters: several stream sets on one backbone, switched without copying it."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from parscale.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import ParScaleForCausalLM, to_parscale


def _ids(batch=2, length=7, seed=1):
    return torch.randint(2, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _streams_model(tiny_factory, n_streams, seed, **overrides):
    """A P-stream model on the seed-0 tiny backbone, with non-trivial aggregation weights."""
    model = to_parscale(tiny_factory("qwen2", **overrides), ParScaleConfig(n_streams, 3), seed=seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 100)
        for p in model.model.aggregate_layer[2].parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture
def saved(tiny_factory, tmp_path):
    """A plain backbone directory, and a full model + adapter for P = 2 and P = 4."""
    tiny_factory("qwen2").save_pretrained(tmp_path / "base")
    for n in (2, 4):
        model = _streams_model(tiny_factory, n, seed=n)
        model.save_pretrained(tmp_path / f"full{n}")
        model.save_streams(tmp_path / f"p{n}", base_model_name_or_path="base")
    return tmp_path


def test_switching_gives_the_full_models_logits_and_none_gives_the_base(saved, tiny_factory):
    model = ParScaleForCausalLM.from_pretrained(saved / "base")
    assert model.parscale_config.n_streams == 1 and model.stream_sets() == []
    assert model.load_streams(saved / "p2") == "p2"
    model.load_streams(saved / "p4", name="four")
    assert model.stream_sets() == ["four", "p2"] and model.active_streams is None
    ids, prompt = _ids(), _ids(1, 3, seed=2)
    for name, full_dir in [("p2", "full2"), ("four", "full4"), ("p2", "full2"), (None, "base"), ("four", "full4")]:
        model.set_streams(name)
        full = ParScaleForCausalLM.from_pretrained(saved / full_dir)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, full(ids).logits), name
            got = model.generate(prompt, max_new_tokens=5, do_sample=False)
            assert torch.equal(got, full.generate(prompt, max_new_tokens=5, do_sample=False)), name
    model.set_streams(None)
    model.use_fast_kernels(False)  # the stock matmul, as the plain transformers model uses
    with torch.no_grad():  # the base model itself, not only our P = 1 path
        torch.testing.assert_close(model(ids).logits, tiny_factory("qwen2")(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("start", ["built with P = 4", "a loaded set switched in", "the one-prefix control"])
def test_set_streams_none_leaves_the_base_model_in_every_respect(saved, tiny_factory, tmp_path, start):
    """Not only the logits (P = 1 never calls the aggregation head): the modules, the parameters,
    the state dict and the saved files are the base model's, and a save and reload gives its logits."""
    if start == "built with P = 4":
        model = _streams_model(tiny_factory, 4, seed=4)
    elif start == "a loaded set switched in":
        model = ParScaleForCausalLM.from_pretrained(saved / "base")
        model.set_streams(model.load_streams(saved / "p4"))
    else:
        model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(1, 3, prefix_at_p1=True), seed=4).eval()
    assert model.active_streams is not None and list(model.stream_parameters())
    model.set_streams(None)
    base = tiny_factory("qwen2")
    assert list(model.state_dict()) == list(base.state_dict())
    assert [n for n, _ in model.named_modules()] == [n for n, _ in base.named_modules()]
    assert list(model.stream_parameters()) == [] and model.parscale_config == ParScaleConfig(1)
    # the stock sdpa and mask, with the CPU decode kernel for single queries (test_decode_attention)
    assert model.config._attn_implementation == "parscale_plain_sdpa"
    model.save_pretrained(tmp_path / "plain")
    reloaded = ParScaleForCausalLM.from_pretrained(tmp_path / "plain")
    for m in (model, reloaded):
        m.use_fast_kernels(False)  # the stock matmul, as the base model uses: then bit for bit
    ids = _ids()
    with torch.no_grad():
        want = base(ids).logits
        assert torch.equal(model(ids).logits, want) and torch.equal(reloaded(ids).logits, want)


def test_the_one_prefix_control_is_a_stream_set_too(saved, tiny_factory, tmp_path):
    """Its prefix is kept as "default" when another set is switched in, and saved and loaded
    like any set (no aggregation head), so switching back gives its own logits."""
    control = to_parscale(tiny_factory("qwen2"), ParScaleConfig(1, 3, prefix_at_p1=True), seed=4).eval()
    ids = _ids()
    with torch.no_grad():
        want = control(ids).logits
    control.save_streams(tmp_path / "control")
    assert control.stream_sets() == ["default"]
    control.load_streams(saved / "p2")
    control.set_streams("p2")
    control.set_streams("default")
    base = ParScaleForCausalLM.from_pretrained(saved / "base")
    assert base.load_streams(tmp_path / "control") == "p1-prefix"
    base.set_streams("p1-prefix")
    with torch.no_grad():
        assert torch.equal(control(ids).logits, want) and torch.equal(base(ids).logits, want)
    assert "aggregate" not in " ".join(base.state_dict()) and base.parscale_config.prefix_at_p1


def test_sets_add_only_their_own_bytes_and_switching_copies_no_backbone_weight(saved):
    model = ParScaleForCausalLM.from_pretrained(saved / "base")
    backbone = {n: p.data_ptr() for n, p in model.named_parameters()}
    backbone_bytes = sum(p.numel() * 4 for p in model.parameters())
    model.load_streams(saved / "p2")
    model.load_streams(saved / "p4")
    model.set_streams("p4")
    model.set_streams("p2")
    assert {n: p.data_ptr() for n, p in model.named_parameters() if n in backbone} == backbone

    def set_bytes(n_streams, layers=2, kv=2, prefix=3, head_dim=8, hidden=32):
        prefixes = 2 * layers * n_streams * kv * prefix * head_dim
        aggregation = n_streams * hidden * hidden + hidden + hidden * n_streams + n_streams
        return 4 * (prefixes + aggregation)  # float32

    tensors = list(model.parameters()) + [t for name in ("p2", "p4")
                                          for t in model._stream_sets[name].tensors(model).values()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert sum(storages.values()) == backbone_bytes + set_bytes(2) + set_bytes(4)


@pytest.mark.parametrize("change,needle", [
    (dict(seed=1), "tensors hold other values"),
    (dict(num_hidden_layers=3), "in the model but not in the adapter's backbone"),
    (dict(intermediate_size=48), "has shape [48, 32]"),
])
def test_an_adapter_for_another_backbone_is_refused(saved, tiny_factory, change, needle):
    seed = change.pop("seed", 0)
    other = to_parscale(tiny_factory("qwen2", seed=seed, **change), ParScaleConfig(1))
    with pytest.raises(ValueError, match="trained on another backbone") as err:
        other.load_streams(saved / "p4")
    assert needle in str(err.value) and "base model: base" in str(err.value)
    assert other.stream_sets() == []


@pytest.mark.parametrize("change,field,values", [
    (dict(rope_theta=100.0), "rope_parameters.rope_theta", ("100.0", "10000.0")),
    (dict(rms_norm_eps=1e-5), "rms_norm_eps", ("1e-05", "1e-06")),
])
def test_the_same_weights_under_another_config_are_refused(saved, tiny_factory, change, field, values):
    other = to_parscale(tiny_factory("qwen2", **change), ParScaleConfig(1))
    same = to_parscale(tiny_factory("qwen2"), ParScaleConfig(1))
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), same.state_dict().values()))
    with torch.no_grad():  # the field changes what the backbone computes
        assert (other(_ids()).logits - same(_ids()).logits).abs().max() > 1e-4
    with pytest.raises(ValueError, match="trained on another backbone") as err:
        other.load_streams(saved / "p4")
    message = str(err.value)
    assert f"config field {field} is {values[0]} in the model, {values[1]} in the adapter's backbone" in message
    assert "tensors hold other values" not in message and other.stream_sets() == []


def test_config_fields_that_do_not_change_the_computation_are_not_compared(saved, tiny_factory):
    other = to_parscale(tiny_factory("qwen2", eos_token_id=5, use_cache=False, bos_token_id=2), ParScaleConfig(1))
    other.config._name_or_path = "elsewhere"
    assert other.load_streams(saved / "p4") == "p4"


def test_an_adapter_without_a_recorded_config_loads_with_a_warning(saved, tiny_factory, tmp_path, caplog):
    """Adapters written before the config was part of the fingerprint stay loadable."""
    old = tmp_path / "old"
    old.mkdir()
    (old / ADAPTER_WEIGHTS).write_bytes((saved / "p4" / ADAPTER_WEIGHTS).read_bytes())
    config = json.loads((saved / "p4" / ADAPTER_CONFIG).read_text())
    del config["backbone"]["config"]
    (old / ADAPTER_CONFIG).write_text(json.dumps(config))
    model = to_parscale(tiny_factory("qwen2", rope_theta=5000.0), ParScaleConfig(1))
    with caplog.at_level("WARNING"):
        assert model.load_streams(old) == "p4"
    assert "records no backbone config (written by an older version)" in caplog.text


def test_the_adapter_files_follow_peft_and_hold_only_stream_tensors(saved):
    config = json.loads((saved / "p4" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "PARSCALE_STREAMS" and config["base_model_name_or_path"] == "base"
    assert config["parscale"] == {"n_streams": 4, "n_prefix_tokens": 3, "attn_smooth": 0.01}
    weights = load_file(str(saved / "p4" / ADAPTER_WEIGHTS))
    full = load_file(str(saved / "full4" / "model.safetensors"))
    stream_keys = {k for k in full if "prefix_" in k or "aggregate_layer" in k}
    assert set(weights) == stream_keys and len(stream_keys) == 2 * 2 + 4
    for key in weights:
        assert torch.equal(weights[key], full[key]), key


def test_a_full_model_keeps_its_own_streams_as_default(saved):
    model = ParScaleForCausalLM.from_pretrained(saved / "full4")
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        model.load_streams(saved / "p2")
        model.set_streams("p2")
        assert model.parscale_config.n_streams == 2
        model.set_streams("default")
        assert torch.equal(model(ids).logits, before)
    assert model.stream_sets() == ["default", "p2"]


def test_trained_values_survive_a_switch_and_save_streams_saves_them(saved, tmp_path):
    model = ParScaleForCausalLM.from_pretrained(saved / "base")
    model.load_streams(saved / "p2")
    model.set_streams("p2")
    model.freeze_backbone()
    assert all(("prefix" in n or "aggregate" in n) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        model.model.layers[0].self_attn.prefix_k.add_(1.0)
    model.set_streams(None)
    model.save_streams(tmp_path / "trained", name="p2")
    weights = load_file(str(tmp_path / "trained" / ADAPTER_WEIGHTS))
    original = load_file(str(saved / "p2" / ADAPTER_WEIGHTS))
    key = "model.layers.0.self_attn.prefix_k"
    torch.testing.assert_close(weights[key], original[key] + 1.0, rtol=0, atol=0)


def test_a_bfloat16_backbone_takes_a_float32_adapter(saved):
    model = ParScaleForCausalLM.from_pretrained(saved / "base", dtype=torch.bfloat16)
    model.load_streams(saved / "p4")
    model.set_streams("p4")
    assert model.model.layers[1].self_attn.prefix_v.dtype == torch.bfloat16
    assert model(_ids()).logits.dtype == torch.bfloat16


def test_mistakes_are_clear(saved):
    model = ParScaleForCausalLM.from_pretrained(saved / "base")
    with pytest.raises(ValueError, match="no stream set named 'p8'"):
        model.set_streams("p8")
    with pytest.raises(ValueError, match="no streams to save"):
        model.save_streams(saved / "nothing")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        model.load_streams(saved / "full4")
    model.load_streams(saved / "p2")
    with pytest.raises(ValueError, match="already loaded"):
        model.load_streams(saved / "p2")
