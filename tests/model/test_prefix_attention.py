"""The prefill paths of `prefix_attention`: no mask for unpadded rows, a block mask for packed
rows, eager and flash-attn kinds; each against a float64 loop or the model run per document."""
from __future__ import annotations

import importlib.machinery
import sys
import types
import warnings

import pytest
import torch

from parscale.errors import UserError
from parscale.model import prefix_attention
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import to_parscale


def _reference(query, key, value, n_prefix, scaling):
    """Float64 loop: query i of L sees keys 0..n_prefix+i of the n_prefix+L (prefix, then causal)."""
    rows, heads, q_len, dim = query.shape
    groups = heads // key.shape[1]
    out = torch.zeros(rows, q_len, heads, dim, dtype=torch.float64)
    for row in range(rows):
        for head in range(heads):
            k, v = key[row, head // groups].double(), value[row, head // groups].double()
            for i in range(q_len):
                scores = k[: n_prefix + i + 1] @ query[row, head, i].double() * scaling
                out[row, i, head] = torch.softmax(scores, 0) @ v[: n_prefix + i + 1]
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("shared_mask", [True, False], ids=["cpu_shared_mask", "gpu_zero_queries"])
def test_causal_prefix_sdpa_equals_a_float64_loop(dtype, tol, groups, shared_mask):
    gen = torch.Generator().manual_seed(0)
    rows, kv, q_len, n_prefix, dim = 3, 2, 7, 4, 8
    query = torch.randn(rows, kv * groups, q_len, dim, generator=gen).to(dtype)
    key, value = (torch.randn(rows, kv, n_prefix + q_len, dim, generator=gen).to(dtype) for _ in range(2))
    got = prefix_attention.causal_prefix_sdpa(query, key, value, dim**-0.5, shared_mask=shared_mask)
    assert got.shape == (rows, q_len, kv * groups, dim) and got.dtype == dtype
    torch.testing.assert_close(got.double(), _reference(query, key, value, n_prefix, dim**-0.5), rtol=tol, atol=tol)


def _model(tiny_factory, n_streams=2, family="qwen2", **overrides):
    model = to_parscale(tiny_factory(family, **overrides), ParScaleConfig(n_streams, 3), seed=0)
    with torch.no_grad():
        for p in model.model.aggregate_layer[2].parameters() if n_streams > 1 else []:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    return model.eval()


def test_unpadded_rows_build_no_mask(tiny_factory, count_calls):
    """Training and plain prefill: the mask function answers None, so no [rows, 1, L, T+L] tensor
    exists, and the logits equal those of the same rows with an explicit (all-ones) padding
    mask forced through the materialised path."""
    model = _model(tiny_factory, n_streams=4)
    ids = torch.randint(2, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    made = []
    original = prefix_attention.plain_prefix_mask

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    calls = count_calls(prefix_attention, "causal_prefix_sdpa")
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(prefix_attention, "plain_prefix_mask", spy)
        fast = model(ids).logits
        assert made and all(mask is None for mask in made) and calls[0] == 2  # two layers
        mp.setattr(prefix_attention, "plain_prefix_mask",
                   lambda *a, **k: original(*a, **{**k, "allow_is_causal_skip": False}))
        materialised = model(ids).logits
    assert calls[0] == 2  # the forced run took the mask path
    torch.testing.assert_close(fast, materialised, rtol=1e-5, atol=1e-5)


def _packed(lengths, seed=3):
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, 97, (n,), generator=gen) for n in lengths]
    return docs, torch.cat(docs)[None], torch.cat([torch.arange(n) for n in lengths])[None]


@pytest.mark.parametrize("block_mask", [False, True], ids=["materialised", "flex_block_mask"])
def test_packed_rows_equal_each_document_alone(tiny_factory, monkeypatch, block_mask):
    """Position ids that restart (packing): every document attends to its own tokens and its
    stream's prefix only. The block-mask path (CUDA's) is forced here on the CPU, where FlexAttention
    runs unfused."""
    model = _model(tiny_factory, n_streams=2)
    docs, ids, positions = _packed([4, 6, 3])
    if block_mask:
        monkeypatch.setattr(prefix_attention.PackedMask, "applies", staticmethod(
            lambda kwargs: kwargs.get("q_length", 0) > 1 and not kwargs.get("allow_is_causal_skip", True)))
    calls = []
    original = prefix_attention.PackedMask.block_mask
    monkeypatch.setattr(prefix_attention.PackedMask, "block_mask",
                        lambda self, n: calls.append(n) or original(self, n))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        packed = model(ids, position_ids=positions, use_cache=False).logits[0]  # as in training: no cache
        alone = torch.cat([model(doc[None]).logits[0] for doc in docs])
    assert (len(calls) == 2) == block_mask  # one block mask per layer call, built once per prefix length
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_eager_kind_equals_sdpa_and_returns_the_weights(tiny_factory):
    """attn_implementation="eager" is honoured: the same logits, in prefill and in generate, and
    the attention weights over [prefix ; keys] (rows sum to 1, the T prefix columns included)."""
    sdpa = _model(tiny_factory, n_streams=2)
    base = tiny_factory("qwen2")
    base.set_attn_implementation("eager")
    eager = to_parscale(base, ParScaleConfig(2, 3), seed=0).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert eager.config._attn_implementation == "parscale_eager"
    ids = torch.randint(2, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        out = eager(ids, attention_mask=mask, output_attentions=True)
        torch.testing.assert_close(out.logits, sdpa(ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
        weights = out.attentions[0]  # (P B) heads L (T+L)
        assert weights.shape == (4, 4, 6, 3 + 6)
        torch.testing.assert_close(weights.sum(-1), torch.ones(4, 4, 6))
        assert torch.equal(eager.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False),
                           sdpa.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))


def test_flash_attention_2_uses_flash_attn_bottom_right(monkeypatch):
    """With the flash-attn package present, unpadded rows go to its `flash_attn_func` with the
    prefix joined and `causal=True` (bottom-right aligned there); a stand-in checks the call."""
    seen = {}

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):  # rows L h d layout
        seen.update(q=q.shape, k=k.shape, causal=causal)
        out = prefix_attention.causal_prefix_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  softmax_scale)
        return out

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_func = flash_attn_func
    fake.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    assert prefix_attention.implementation_for("flash_attention_2") == "parscale_fa2"
    gen = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.prefix_k, module.prefix_v = (torch.randn(2, 2, 3, 8, generator=gen) for _ in range(2))
    query = torch.randn(4, 4, 5, 8, generator=gen)
    key, value = (torch.randn(4, 2, 5, 8, generator=gen) for _ in range(2))
    out, _ = prefix_attention.flash_attention(module, query, key, value, None, scaling=8**-0.5)
    assert seen == {"q": (4, 5, 4, 8), "k": (4, 3 + 5, 2, 8), "causal": True}
    joined_k = torch.cat([module.prefix_k.repeat_interleave(2, 0), key], 2)
    joined_v = torch.cat([module.prefix_v.repeat_interleave(2, 0), value], 2)
    torch.testing.assert_close(out.double(), _reference(query, joined_k, joined_v, 3, 8**-0.5), rtol=1e-5, atol=1e-5)


def test_flash_attention_2_without_the_package_is_one_line(monkeypatch):
    monkeypatch.setattr(prefix_attention.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="flash-attn package"):
        prefix_attention.implementation_for("flash_attention_2")
    with pytest.raises(UserError, match="flex_attention.*cannot carry"):
        prefix_attention.implementation_for("flex_attention")


@pytest.mark.slow
def test_compiled_static_cache_decoding_equals_eager(tiny_factory):
    """`generate` with a static cache and a `torch.compile`d step (one graph, no break) gives the
    eager tokens at P = 4, left-padded batch of 2 (inductor's CPU backend here; CUDA graphs there)."""
    from parscale.model.decoding import compiled_generate_kwargs

    model = _model(tiny_factory, n_streams=4, num_hidden_layers=1)
    ids = torch.randint(2, 97, (2, 5), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        eager = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        compiled = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                  **compiled_generate_kwargs("cpu"))
    assert hasattr(model, "_compiled_call")  # transformers did compile the step
    assert torch.equal(compiled, eager)
