"""Per-stream LoRA on the attention projections: each stream's rows get their own low-rank term,
a new model computes exactly what it did without, and the adapters live and travel with the
streams (save/load, stream sets, cache, generation, int8, the decode kernel, training)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from _isa import compiler_present
from parscale.errors import UserError
from parscale.model import kernels, quantize, stream_lora
from parscale.model.cache_api import output_cache
from parscale.model.config import ParScaleConfig
from parscale.model.diagnostics import capture_stream_states
from parscale.model.wrapper import ParScaleForCausalLM, to_parscale

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _ids(batch=2, length=7, seed=1):
    return torch.randint(2, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _lora_model(tiny_factory, n_streams=2, rank=4, alpha=None, family="qwen2", seed=3, prefix_at_p1=False):
    """A model whose adapters are non-zero (B drawn too), so that they change what it computes."""
    config = ParScaleConfig(n_streams, 3, stream_lora_rank=rank, stream_lora_alpha=alpha, prefix_at_p1=prefix_at_p1)
    model = to_parscale(tiny_factory(family), config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("stream_lora_B", "aggregate_layer.2.weight")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model.eval()


def _states(model, ids):
    """The streams' final hidden states `n b s h` (what enters the aggregation)."""
    with torch.no_grad(), capture_stream_states(model) as seen:
        model(ids)
    n = model.parscale_config.n_streams
    return seen[0].view(n, ids.shape[0], *seen[0].shape[1:])


def test_one_projection_equals_a_float64_loop_over_streams_and_rows(tiny_factory):
    """q_proj of layer 0 at P = 3, alpha 6 on rank 2 (scale 3): for row s*B + b, every position,
    y = W x + bias + 3 * B_s (A_s x), computed vector by vector in float64."""
    model = _lora_model(tiny_factory, n_streams=3, rank=2, alpha=6.0)
    q_proj = model.model.layers[0].self_attn.q_proj
    seen = []
    q_proj.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))  # runs after the adapter's
    ids = _ids(2, 5)
    with torch.no_grad():
        model(ids)
    x, y = seen[0]
    assert x.shape == (3 * 2, 5, 32) and y.shape == (3 * 2, 5, 32)
    w, bias = q_proj.weight.double(), q_proj.bias.double()
    lora_a, lora_b = q_proj.stream_lora_A.double(), q_proj.stream_lora_B.double()
    assert lora_a.shape == (3, 2, 32) and lora_b.shape == (3, 32, 2) and q_proj.stream_lora_scale == 3.0
    for stream in range(3):
        for sample in range(2):
            row = stream * 2 + sample
            for t in range(5):
                v = x[row, t].double()
                want = w @ v + bias + 3.0 * (lora_b[stream] @ (lora_a[stream] @ v))
                torch.testing.assert_close(y[row, t].double(), want, rtol=1e-5, atol=1e-5)
    # the low-rank term alone, through the public function, in float64
    delta = stream_lora.stream_delta(x.double(), lora_a, lora_b, 3.0)
    assert delta.dtype == torch.float64 and delta.abs().max() > 1e-3
    torch.testing.assert_close(delta[4, 2], 3.0 * lora_b[2] @ (lora_a[2] @ x[4, 2].double()))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_zero_b_at_init_leaves_the_model_bit_for_bit_unchanged(tiny_factory, family):
    """B starts at zero and A is drawn after every other stream parameter, so the prefixes and
    the logits equal those of the same model without adapters (stock matmul)."""
    ids = _ids()
    plain = to_parscale(tiny_factory(family), ParScaleConfig(2, 3), seed=7).eval()
    lora = to_parscale(tiny_factory(family), ParScaleConfig(2, 3, stream_lora_rank=4), seed=7).eval()
    for model in (plain, lora):
        model.use_fast_kernels(False)
    a = lora.model.layers[1].self_attn.v_proj.stream_lora_A
    assert a.abs().max() > 0 and not lora.model.layers[1].self_attn.v_proj.stream_lora_B.any()
    assert not torch.equal(a[0], a[1])  # each stream its own draw
    assert torch.equal(plain.model.layers[1].self_attn.prefix_v, lora.model.layers[1].self_attn.prefix_v)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, lora(ids).logits)
        assert torch.equal(plain.generate(ids, max_new_tokens=4, do_sample=False),
                           lora.generate(ids, max_new_tokens=4, do_sample=False))


def test_a_is_drawn_like_peft_from_the_seed(tiny_factory):
    """U(+-1/sqrt(in)): in = 32 for q, k, v (hidden) and for o (4 heads x 8); 2 x 4 x 2 x 16 x 32
    = 8192 draws of q_proj/o_proj alone. The std of U(-b, b) is b/sqrt(3)."""
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 3, stream_lora_rank=16), seed=2)
    again = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 3, stream_lora_rank=16), seed=2)
    draws = torch.cat([getattr(layer.self_attn, p).stream_lora_A.detach().flatten()
                       for layer in model.model.layers for p in PROJECTIONS])
    bound = 1 / 32 ** 0.5
    assert draws.abs().max() <= bound and draws.abs().max() > 0.99 * bound
    assert draws.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.03)
    first, second = (m.model.layers[0].self_attn.k_proj.stream_lora_A for m in (model, again))
    assert torch.equal(first, second)


def test_each_streams_rows_get_their_own_adapter(tiny_factory):
    """Changing stream 1's B changes stream 1's states only; permuting the streams together with
    their prefixes and adapters permutes the streams' states."""
    model = _lora_model(tiny_factory, n_streams=3)
    ids = _ids()
    before = _states(model, ids)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.stream_lora_B[1] += 0.5
    after = _states(model, ids)
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert (after[1] - before[1]).abs().max() > 1e-3
    perm = torch.tensor([2, 0, 1])  # new stream j is old stream perm[j]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("prefix_k", "prefix_v", "stream_lora_A", "stream_lora_B")):
                param.copy_(param[perm])
    permuted = _states(model, ids)
    torch.testing.assert_close(permuted, after[perm])
    assert (permuted - after).abs().max() > 1e-3  # the check can fail: the streams differ


@pytest.mark.parametrize("n_streams,family", [(2, "qwen2"), (4, "mistral")])
def test_cached_decoding_equals_the_uncached_forward(tiny_factory, n_streams, family, count_calls):
    """With the decode kernel on: few-row steps take it (`SkinnyLinear` keeps the adapters' hook)."""
    model = _lora_model(tiny_factory, n_streams=n_streams, family=family)
    ids = _ids(2, 10)
    calls = count_calls(kernels, "skinny_linear")
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4], use_cache=True)
        steps, cache = [out.logits], output_cache(out)
        for t in range(4, 10):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = output_cache(out)
            steps.append(out.logits)
    assert calls[0] > 0 or not compiler_present()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    model.use_fast_kernels(False)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.stream_lora_B.zero_()
        assert (model(ids).logits - full).abs().max() > 1e-4  # the adapters were part of it


def test_generate_greedy_static_and_beam_search(tiny_factory):
    model = _lora_model(tiny_factory, n_streams=2, family="llama")
    ids = _ids(2, 4)
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=5, do_sample=False)
        seq = ids
        for _ in range(5):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        static = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
        beams = model.generate(ids[:1], max_new_tokens=4, num_beams=3, num_return_sequences=3, do_sample=False,
                               length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
        logprobs = torch.log_softmax(model(beams.sequences).logits.double(), dim=-1)  # uncached rescoring
    assert torch.equal(greedy, seq) and torch.equal(static, greedy)
    rescored = logprobs[:, 3:-1].gather(-1, beams.sequences[:, 4:, None])[..., 0].sum(-1)
    torch.testing.assert_close(beams.sequences_scores.double(), rescored, rtol=1e-4, atol=1e-4)


def test_full_model_save_and_load_round_trip(tiny_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _lora_model(tiny_factory, n_streams=2, rank=4, alpha=8.0)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["parscale_stream_lora_rank"] == 4 and config["parscale_stream_lora_alpha"] == 8.0
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved["model.layers.1.self_attn.k_proj.stream_lora_A"].shape == (2, 4, 32)
    assert saved["model.layers.1.self_attn.k_proj.stream_lora_B"].shape == (2, 16, 4)  # 2 kv heads x 8
    assert torch.equal(saved["model.layers.0.self_attn.o_proj.stream_lora_B"],
                       model.model.layers[0].self_attn.o_proj.stream_lora_B)
    assert "model.layers.0.self_attn.q_proj.weight" in saved  # the backbone's keys are the released ones
    for loaded in (ParScaleForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert loaded.parscale_config == model.parscale_config
        assert loaded.model.layers[0].self_attn.q_proj.stream_lora_scale == 2.0
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want)
    # a model without adapters keeps the released config.json
    to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 3)).save_pretrained(tmp_path / "plain")
    assert not any("lora" in k for k in json.loads((tmp_path / "plain" / "config.json").read_text()))


def test_stream_adapters_carry_the_lora_and_switching_removes_it(tiny_factory, tmp_path):
    tiny_factory("qwen2").save_pretrained(tmp_path / "base")
    full = _lora_model(tiny_factory, n_streams=2, rank=3)
    full.save_streams(tmp_path / "adapter", base_model_name_or_path="base")
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    lora_keys = sorted(k for k in weights if "stream_lora" in k)
    assert len(lora_keys) == 2 * 4 * 2  # layers x projections x (A, B)
    assert not any(k.endswith((".weight", ".bias")) and "aggregate_layer" not in k for k in weights)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["parscale"]["stream_lora_rank"] == 3
    model = ParScaleForCausalLM.from_pretrained(tmp_path / "base")
    model.set_streams(model.load_streams(tmp_path / "adapter"))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, full(ids).logits)
    model.set_streams(None)  # the plain backbone: no adapter, no hook, the base model's keys and logits
    base = tiny_factory("qwen2")
    assert list(model.state_dict()) == list(base.state_dict())
    assert all(not getattr(m, "_forward_hooks", None) for m in model.modules())
    for m in (model, full):
        m.use_fast_kernels(False)  # the stock matmul, as the base model uses: then bit for bit
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    model.set_streams("p2")  # and back: the same tensors, the same logits
    with torch.no_grad():
        assert torch.equal(model(ids).logits, full(ids).logits)


def test_int8_keeps_the_adapters_in_float(tiny_factory):
    """The quantized model equals the float model whose Linear weights were replaced by their int8
    values (the adapters untouched), and the adapters still act."""
    model = _lora_model(tiny_factory, n_streams=2)
    model.use_fast_kernels(False)
    ref = copy.deepcopy(model)
    embedding = ref.get_input_embeddings().weight
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, nn.Linear) and "aggregate_layer" not in name and module.weight is not embedding:
                module.weight.copy_(quantize.dequantize(*quantize.quantize_weight(module.weight)))
    adapters = {n: p for n, p in model.named_parameters() if "stream_lora" in n}
    model.quantize_int8()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, quantize.Int8Linear) and q_proj.stream_lora_A.dtype == torch.float32
    assert {n: p for n, p in model.named_parameters() if "stream_lora" in n} == adapters  # the same tensors
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        got = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(got, ref.generate(ids, max_new_tokens=5, do_sample=False))
        before = model(ids).logits
        q_proj.stream_lora_B.zero_()
        assert (model(ids).logits - before).abs().max() > 1e-4


def test_the_adapters_are_stream_parameters_and_train_with_a_frozen_backbone(tiny_factory):
    model = _lora_model(tiny_factory, n_streams=2).train()
    names = [n for n, _ in model.stream_parameters()]
    assert "model.layers.1.self_attn.o_proj.stream_lora_A" in names and len([n for n in names if "lora" in n]) == 16
    model.freeze_backbone()
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if n not in names}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}
    opt = torch.optim.AdamW([p for _, p in model.stream_parameters()], lr=1e-2)
    for _ in range(2):  # A gets a gradient once B is non-zero
        model(_ids(), labels=_ids()).loss.backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in backbone.items())
    assert all(not torch.equal(params[n], v) for n, v in lora.items())


def test_the_one_prefix_control_takes_adapters_too(tiny_factory):
    model = _lora_model(tiny_factory, n_streams=1, prefix_at_p1=True)
    plain = to_parscale(tiny_factory("qwen2"), ParScaleConfig(1, 3, prefix_at_p1=True), seed=3).eval()
    ids = _ids()
    with torch.no_grad():
        assert (model(ids).logits - plain(ids).logits).abs().max() > 1e-4
    assert model.model.layers[0].self_attn.q_proj.stream_lora_A.shape == (1, 4, 32)


def test_mistakes_are_refused_clearly(tiny_factory):
    with pytest.raises(UserError, match="plain P = 1 model has no streams"):
        ParScaleConfig(1, stream_lora_rank=4)
    with pytest.raises(UserError, match="stream_lora_rank must be >= 0"):
        ParScaleConfig(2, stream_lora_rank=-1)
    with pytest.raises(UserError, match="stream_lora_rank must be an integer"):
        ParScaleConfig(2, stream_lora_rank=4.0)
    with pytest.raises(UserError, match="set stream_lora_rank too"):
        ParScaleConfig(2, stream_lora_alpha=8.0)
    with pytest.raises(UserError, match="stream_lora_alpha must be a positive number"):
        ParScaleConfig(2, stream_lora_rank=4, stream_lora_alpha=0)
    assert ParScaleConfig(2, stream_lora_rank=4).to_dict()["stream_lora_rank"] == 4
    assert ParScaleConfig.from_dict(ParScaleConfig(2, stream_lora_rank=4, stream_lora_alpha=2).to_dict()) == \
        ParScaleConfig(2, stream_lora_rank=4, stream_lora_alpha=2.0)
    base = tiny_factory("qwen2")
    for layer in base.model.layers:  # as a fused-qkv architecture would look
        del layer.self_attn.k_proj
    with pytest.raises(UserError, match="no separate k_proj"):
        to_parscale(base, ParScaleConfig(2, 3, stream_lora_rank=4))
    model = _lora_model(tiny_factory)
    with pytest.raises(UserError, match="not a multiple of P=2"):
        model.model.layers[0].self_attn.q_proj(torch.randn(3, 4, 32))


def test_vllm_serving_refuses_a_checkpoint_with_adapters():
    from parscale.serve.prompts import check_servable

    config = {"model_type": "qwen2_parscale", "parscale_n": 2, "hidden_size": 32, "num_attention_heads": 4}
    check_servable(config)
    with pytest.raises(UserError, match="per-stream adapters"):
        check_servable({**config, "parscale_stream_lora_rank": 4})
