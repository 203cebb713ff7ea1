"""The released `qwen2_parscale` format: a hand-built checkpoint against a hand-written reference.

The reference below is written from the published semantics, not from the wrapper: a slow
float64 loop over streams, layers and heads (embeddings, RMSNorm, rotary, prefix keys/values
concatenated after rotary, GQA, SwiGLU MLP, per-stream final norm, interleaved aggregation
with smoothing, tied lm_head).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from parscale.errors import UserError
from parscale.model.wrapper import ParScaleForCausalLM, to_parscale
from parscale.model.config import ParScaleConfig

V, H, I, LAYERS, NH, NKV, THETA, RMS_EPS = 61, 24, 40, 2, 4, 2, 10000.0, 1e-6
D = H // NH


def released_config(n_streams: int, n_tokens: int, smooth: float = 0.1) -> dict:
    return {
        "architectures": ["Qwen2ParScaleForCausalLM"], "model_type": "qwen2_parscale",
        "vocab_size": V, "hidden_size": H, "intermediate_size": I, "num_hidden_layers": LAYERS,
        "num_attention_heads": NH, "num_key_value_heads": NKV, "hidden_act": "silu",
        "max_position_embeddings": 64, "rms_norm_eps": RMS_EPS, "rope_theta": THETA, "rope_scaling": None,
        "tie_word_embeddings": True, "torch_dtype": "float32", "use_sliding_window": False,
        "sliding_window": 4096, "max_window_layers": 21, "attention_dropout": 0.0, "use_cache": True,
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "transformers_version": "4.51.0",
        "parscale_n": n_streams, "parscale_n_tokens": n_tokens, "parscale_attn_smooth": smooth,
    }


def released_weights(n_streams: int, n_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2, shift=0.0):
        return torch.randn(shape, generator=gen) * scale + shift

    w = {"model.embed_tokens.weight": rnd(V, H, scale=0.5), "model.norm.weight": rnd(H, scale=0.1, shift=1.0)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": rnd(H, scale=0.1, shift=1.0),
            p + "post_attention_layernorm.weight": rnd(H, scale=0.1, shift=1.0),
            p + "self_attn.q_proj.weight": rnd(NH * D, H), p + "self_attn.q_proj.bias": rnd(NH * D),
            p + "self_attn.k_proj.weight": rnd(NKV * D, H), p + "self_attn.k_proj.bias": rnd(NKV * D),
            p + "self_attn.v_proj.weight": rnd(NKV * D, H), p + "self_attn.v_proj.bias": rnd(NKV * D),
            p + "self_attn.o_proj.weight": rnd(H, NH * D),
            p + "mlp.gate_proj.weight": rnd(I, H), p + "mlp.up_proj.weight": rnd(I, H),
            p + "mlp.down_proj.weight": rnd(H, I),
        }
        if n_streams > 1:
            w[p + "self_attn.prefix_k"] = rnd(n_streams, NKV, n_tokens, D, scale=1.0)
            w[p + "self_attn.prefix_v"] = rnd(n_streams, NKV, n_tokens, D, scale=1.0)
    if n_streams > 1:
        w |= {
            "model.aggregate_layer.0.weight": rnd(H, n_streams * H), "model.aggregate_layer.0.bias": rnd(H),
            "model.aggregate_layer.2.weight": rnd(n_streams, H, scale=1.0), "model.aggregate_layer.2.bias": rnd(n_streams),
        }
    return w


def write_checkpoint(directory, config: dict, weights: dict, shards: int = 1) -> None:
    (directory / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    keys, weight_map = sorted(weights), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in keys[s::shards]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ----- the independent reference ---------------------------------------------------------
def _rms(x, weight):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def _rotary(x, positions):  # x: L heads d
    inv_freq = 1.0 / THETA ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = positions[:, None].double() * inv_freq[None]  # L d/2
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    rotated = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1)
    return x * cos + rotated * sin


def _layer(x, w, p, stream, n_streams):
    L = x.shape[0]
    h = _rms(x, w[p + "input_layernorm.weight"])
    q = (h @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]).view(L, NH, D)
    k = (h @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]).view(L, NKV, D)
    v = (h @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]).view(L, NKV, D)
    q, k = _rotary(q, torch.arange(L)), _rotary(k, torch.arange(L))
    if n_streams > 1:  # prefix after rotary, never rotated
        k = torch.cat([w[p + "self_attn.prefix_k"][stream].transpose(0, 1), k])  # (T+L) kv d
        v = torch.cat([w[p + "self_attn.prefix_v"][stream].transpose(0, 1), v])
    n_prefix = k.shape[0] - L
    heads = []
    for head in range(NH):
        kv_head = head // (NH // NKV)
        out = torch.zeros(L, D, dtype=torch.float64)
        for i in range(L):
            visible = n_prefix + i + 1  # every prefix slot and real keys 0..i
            scores = k[:visible, kv_head] @ q[i, head] / math.sqrt(D)
            out[i] = torch.softmax(scores, 0) @ v[:visible, kv_head]
        heads.append(out)
    x = x + torch.cat(heads, -1) @ w[p + "self_attn.o_proj.weight"].T
    h = _rms(x, w[p + "post_attention_layernorm.weight"])
    gate = h @ w[p + "mlp.gate_proj.weight"].T
    up = h @ w[p + "mlp.up_proj.weight"].T
    return x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T


def reference_logits(weights: dict, ids: list[int], n_streams: int, smooth: float) -> torch.Tensor:
    w = {k: v.double() for k, v in weights.items()}
    x0 = w["model.embed_tokens.weight"][ids]
    finals = []
    for stream in range(n_streams):
        x = x0
        for i in range(LAYERS):
            x = _layer(x, w, f"model.layers.{i}.", stream, n_streams)
        finals.append(_rms(x, w["model.norm.weight"]))
    if n_streams == 1:
        y = finals[0]
    else:
        feats = torch.stack(finals, -1).reshape(len(ids), H * n_streams)  # feature h*P + n
        hidden = feats @ w["model.aggregate_layer.0.weight"].T + w["model.aggregate_layer.0.bias"]
        scores = (hidden * torch.sigmoid(hidden)) @ w["model.aggregate_layer.2.weight"].T + w["model.aggregate_layer.2.bias"]
        weight = torch.softmax(scores, -1) * (1 - smooth) + smooth / n_streams
        y = sum(weight[:, n, None] * finals[n] for n in range(n_streams))
    return y @ w["model.embed_tokens.weight"].T  # tied lm_head


# ----- tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("n_streams,shards", [(1, 1), (2, 1), (4, 3)])
def test_released_checkpoint_matches_reference(tmp_path, n_streams, shards):
    weights = released_weights(n_streams, n_tokens=5)
    write_checkpoint(tmp_path, released_config(n_streams, 5), weights, shards=shards)
    model = ParScaleForCausalLM.from_pretrained(tmp_path)
    assert model.parscale_config == ParScaleConfig(n_streams, 5, 0.1)
    samples = [[5, 17, 3, 44, 9, 60, 2], [8, 30, 11]]
    ids = torch.tensor([samples[0], samples[1] + [0] * 4])  # right padded
    mask = (ids != 0) | (torch.arange(7) < 3)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask.long()).logits.double()
    for row, sample in enumerate(samples):
        expected = reference_logits(weights, sample, n_streams, 0.1)
        # float32 model vs float64 reference on O(1) logits: 1e-4 is ~100x float32 rounding here.
        torch.testing.assert_close(logits[row, : len(sample)], expected, rtol=1e-4, atol=1e-4)


def test_round_trip_writes_the_released_format(tmp_path, tiny_qwen2):
    model = to_parscale(tiny_qwen2, ParScaleConfig(3, 4, 0.1), seed=1).eval()
    with torch.no_grad():
        model.model.aggregate_layer[2].weight.normal_()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2_parscale" and config["architectures"] == ["Qwen2ParScaleForCausalLM"]
    assert (config["parscale_n"], config["parscale_n_tokens"], config["parscale_attn_smooth"]) == (3, 4, 0.1)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        assert list(handle.get_slice("model.layers.1.self_attn.prefix_k").get_shape()) == [3, 2, 4, 8]
        assert list(handle.get_slice("model.aggregate_layer.0.weight").get_shape()) == [32, 96]
    assert "lm_head.weight" not in keys  # tied embeddings
    assert {"model.aggregate_layer.2.weight", "model.aggregate_layer.2.bias"} <= keys
    loaded = ParScaleForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(2, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_round_trip_other_backbones(tmp_path, tiny_factory, family):
    model = to_parscale(tiny_factory(family), ParScaleConfig(2, 3), seed=2).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family and config["parscale_n"] == 2
    loaded = ParScaleForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(2, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_plain_transformers_directory_loads_as_p1(tmp_path, tiny_factory):
    base = tiny_factory("llama")
    base.save_pretrained(tmp_path)
    loaded = ParScaleForCausalLM.from_pretrained(tmp_path)
    assert loaded.parscale_config.n_streams == 1
    ids = torch.randint(2, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = base(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want)  # the decode kernel (10 rows): float tolerance
        loaded.use_fast_kernels(False)
        assert torch.equal(loaded(ids).logits, want)  # the stock matmul: bit for bit


def test_torch_dtype_argument(tmp_path):
    write_checkpoint(tmp_path, released_config(2, 3), released_weights(2, 3))
    model = ParScaleForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.prefix_k.dtype == torch.bfloat16
    assert model(torch.tensor([[3, 4, 5]])).logits.dtype == torch.bfloat16


def test_mismatched_shape_names_key_and_shapes(tmp_path):
    weights = released_weights(2, 5)
    weights["model.layers.1.self_attn.prefix_v"] = torch.zeros(2, NKV, 7, D)
    write_checkpoint(tmp_path, released_config(2, 5), weights)
    with pytest.raises(UserError, match=r"model\.layers\.1\.self_attn\.prefix_v: expected shape \[2, 2, 5, 6\], found \[2, 2, 7, 6\]"):
        ParScaleForCausalLM.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    weights = released_weights(2, 5)
    del weights["model.aggregate_layer.2.bias"]
    weights["model.extra.weight"] = torch.zeros(3)
    write_checkpoint(tmp_path, released_config(2, 5), weights)
    with pytest.raises(UserError) as err:
        ParScaleForCausalLM.from_pretrained(tmp_path)
    assert "missing key model.aggregate_layer.2.bias: expected shape [2]" in str(err.value)
    assert "unexpected key model.extra.weight with shape [3]" in str(err.value)


def test_p1_config_with_prefix_weights_is_rejected(tmp_path):
    write_checkpoint(tmp_path, released_config(1, 5), released_weights(2, 5))
    with pytest.raises(UserError, match="unexpected key model.aggregate_layer"):
        ParScaleForCausalLM.from_pretrained(tmp_path)


def test_bad_directories_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        ParScaleForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(released_config(2, 5)))
    with pytest.raises(UserError, match="no model.safetensors"):
        ParScaleForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="pickled weights"):
        ParScaleForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(released_config(0, 5)))
    with pytest.raises(UserError, match="n_streams"):
        ParScaleForCausalLM.from_pretrained(tmp_path)


# ----- saving over an earlier save ---------------------------------------------------------
def _prefix_k(directory):
    from safetensors import safe_open

    from parscale.model.format import weight_files

    for path in weight_files(directory):
        with safe_open(str(path), "pt") as handle:
            if "model.layers.0.self_attn.prefix_k" in handle.keys():
                return handle.get_tensor("model.layers.0.self_attn.prefix_k")
    raise AssertionError("no prefix_k saved")


@pytest.mark.parametrize("first,second", [("shards", "single"), ("single", "shards"), ("shards", "shards")])
def test_saving_into_a_folder_replaces_every_earlier_weight_file(tmp_path, tiny_qwen2, first, second):
    """A fine-tuned model saved over its (sharded) source reloads as the fine-tuned model."""
    small = 20_000  # bytes: the tiny model (~60 KB) then needs several shards
    size = {"shards": small, "single": "50GB"}
    model = to_parscale(tiny_qwen2, ParScaleConfig(2, 3), seed=0).eval()
    model.save_pretrained(tmp_path, max_shard_size=size[first])
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert (len(shards) > 1) == (first == "shards")
    assert (tmp_path / "model.safetensors.index.json").is_file() == (first == "shards")
    with torch.no_grad():
        model.model.layers[0].self_attn.prefix_k.add_(1.0)
    model.save_pretrained(tmp_path, max_shard_size=size[second])
    if second == "single":
        assert not list(tmp_path.glob("model-*")) and not (tmp_path / "model.safetensors.index.json").exists()
    else:
        assert not (tmp_path / "model.safetensors").exists()
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert sorted(p.name for p in tmp_path.glob("model-*")) == sorted(set(index["weight_map"].values()))
    reloaded = ParScaleForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.model.layers[0].self_attn.prefix_k, model.model.layers[0].self_attn.prefix_k)
    torch.testing.assert_close(_prefix_k(tmp_path), model.model.layers[0].self_attn.prefix_k)
    ids = torch.randint(2, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_an_index_beside_an_overlapping_single_file_is_refused(tmp_path):
    weights = released_weights(2, 3)
    write_checkpoint(tmp_path, released_config(2, 3), weights, shards=2)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})  # a stale copy beside it
    with pytest.raises(UserError, match="both .*model.safetensors.index.json.* stale"):
        ParScaleForCausalLM.from_pretrained(tmp_path)
