"""The decode step of a Llama-family layer as direct kernel calls (`decode_layer`): the rotary
kernel against transformers' function, the whole step against the same layer's own forward
(the same kernels, called through the modules) bit for bit, which layers it takes, and every
case in which the layer's own forward must run instead."""
from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from _isa import ISA_FLAGS, build_or_skip, require_kernel
from parscale.model import decode_layer, kernels, prefix_attention
from parscale.model.cache_api import NEW_NAME
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import to_parscale


@pytest.fixture(scope="module", params=list(ISA_FLAGS))
def attention_lib(request):
    return build_or_skip(prefix_attention.kernel_library, request.param, "decode attention kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, cos_rows, heads, dim", [(1, 1, 4, 16), (3, 1, 5, 64), (6, 6, 2, 8), (8, 8, 16, 128)])
def test_the_rotary_kernel_is_transformers_function_bit_for_bit(attention_lib, dtype, rows, cos_rows, heads, dim):
    gen = torch.Generator().manual_seed(rows * heads)
    x = (torch.randn(rows, 1, heads * dim, generator=gen) * 4).to(dtype)
    angles = torch.rand(cos_rows, 1, dim // 2, generator=gen) * 100
    angles = torch.cat([angles, angles], dim=-1)  # the rotary embedding's layout: the frequencies twice
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    view = x.view(rows, 1, heads, dim).transpose(1, 2)  # rows heads 1 d, as the attention module has it
    want, _ = apply_rotary_pos_emb(view, view, cos, sin)
    decode_layer.rotary_in_place(x, heads, cos, sin, attention_lib)
    assert torch.equal(x.view(rows, 1, heads, dim).transpose(1, 2), want)


def test_the_rotary_kernel_equals_float64_to_the_dtypes_rounding(attention_lib):
    """An independent check of the formula (transformers' function could share a mistake)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 3 * 8, generator=gen)
    angles = torch.rand(1, 1, 4, generator=gen) * 10
    angles = torch.cat([angles, angles], dim=-1)
    x64 = x.double().view(2, 3, 8)
    c, s = angles.cos().double().view(8), angles.sin().double().view(8)
    first, second = x64[..., :4], x64[..., 4:]
    want = torch.cat([first * c[:4] - second * s[:4], second * c[4:] + first * s[4:]], dim=-1)
    decode_layer.rotary_in_place(x, 3, angles.cos(), angles.sin(), attention_lib)
    torch.testing.assert_close(x.view(2, 3, 8).double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, cos_rows, heads, dim", [(1, 1, 4, 16), (6, 6, 2, 8), (8, 1, 4, 64)])
def test_rotary_append_rotates_the_keys_into_the_cache_column(attention_lib, dtype, rows, cos_rows, heads, dim):
    """The keys rotated as `rotary_in_place` rotates them and the values copied, written into one
    column of a [rows, heads, capacity, d] buffer; every other column left as it was."""
    gen = torch.Generator().manual_seed(rows + heads)
    key, value = ((torch.randn(rows, 1, heads * dim, generator=gen) * 4).to(dtype) for _ in range(2))
    angles = torch.rand(cos_rows, 1, dim // 2, generator=gen) * 100
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    buffers = tuple(torch.randn(rows, heads, 9, dim, generator=gen).to(dtype) for _ in range(2))
    before = tuple(b.clone() for b in buffers)
    decode_layer.rotary_append(key, value, heads, cos, sin, buffers, 5, attention_lib)
    rotated = key.clone()
    decode_layer.rotary_in_place(rotated, heads, cos, sin, attention_lib)
    assert torch.equal(buffers[0][:, :, 5], rotated.view(rows, heads, dim))
    assert torch.equal(buffers[1][:, :, 5], value.view(rows, heads, dim))
    for got, old in zip(buffers, before):
        assert torch.equal(got[:, :, :5], old[:, :, :5]) and torch.equal(got[:, :, 6:], old[:, :, 6:])


def _qwen3(seed: int = 3, **overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(**{**dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0),
                            **overrides})
    return Qwen3ForCausalLM(config).eval()


def test_which_layers_are_recognised(tiny_factory):
    from transformers.models.olmo2.configuration_olmo2 import Olmo2Config
    from transformers.models.olmo2.modeling_olmo2 import Olmo2ForCausalLM

    for family in ("qwen2", "llama", "mistral"):
        model = tiny_factory(family)
        assert all(decode_layer.is_llama_decoder_layer(layer) for layer in model.model.layers), family
    assert all(decode_layer.is_llama_decoder_layer(layer) for layer in _qwen3().model.layers)
    # Gemma's MLP is a GELU, Olmo2 normalises after attention and MLP: their own forward
    assert not any(decode_layer.is_llama_decoder_layer(layer) for layer in tiny_factory("gemma").model.layers)
    olmo2 = Olmo2ForCausalLM(Olmo2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert not decode_layer.is_llama_decoder_layer(olmo2.model.layers[0])


def _model(tiny_factory, n_streams: int, dtype: torch.dtype, family: str = "qwen2", int8: int | None = None):
    """int8: None (float weights), or the int8 activations' bits (`quantize_int8(activation_bits=...)`)."""
    model = to_parscale(tiny_factory(family, seed=3), ParScaleConfig(n_streams), seed=1).to(dtype).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # an aggregation that is not uniform, norms whose weights differ (not all ones)
        for p in model.model.aggregate_layer[2].parameters() if n_streams > 1 else []:
            p.copy_(torch.randn(p.shape, generator=gen))
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model.quantize_int8(activation_bits=int8) if int8 else model


def _padded_batch(batch: int):
    ids = torch.randint(2, 97, (batch, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :2] = mask[-1, :4] = 0  # left padding
    return ids, mask


def _with_and_without_the_step(model, ids, mask, new_tokens: int, steps: list[int]):
    """`generate` with the decode step, then with the layers' own forward (greedy, the logits kept):
    (with, without, the decode steps taken); the second run takes none."""
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
    with torch.no_grad():
        fast = model.generate(ids, **kw)
        taken = steps[0]
        assert decode_layer.enable(model, False) > 0
        own = model.generate(ids, **kw)
    assert steps[0] == taken
    return fast, own, taken


def _libraries_or_fail(int8: bool = False) -> None:
    libs = decode_layer._libraries(int8)
    require_kernel(libs, "CPU decode kernels (product, norm, attention" + (", int8" if int8 else "") + ")")


@pytest.mark.parametrize("chain", [True, False], ids=["chain", "python"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_streams", [1, 2, 4, 8])
def test_each_decode_step_equals_the_layers_own_forward_bit_for_bit(tiny_factory, count_calls, count_steps, monkeypatch,
                                                                    dtype, batch, n_streams, chain):
    """The same kernels in the same order, so the same bits: greedy tokens and every step's logits
    of the step (on) and of the layer's own forward through the modules (off), left-padded rows;
    the step as two C calls (`_chained`) and as its kernels called one by one from Python."""
    _libraries_or_fail()
    if chain and decode_layer.chain_library() is None:
        pytest.fail("the decode step's chain library (csrc/decode_step.cpp) did not build")
    monkeypatch.setattr(decode_layer, "use_chain", chain)
    model = _model(tiny_factory, n_streams, dtype)
    ids, mask = _padded_batch(batch)
    appended, grouped = count_calls(decode_layer, "rotary_append"), count_calls(decode_layer, "_grouped")
    chained = count_steps("_chained")
    fast, own, taken = _with_and_without_the_step(model, ids, mask, 6, count_steps("_step"))
    # two layers, five decode steps (the prefill takes the layer's forward); 24 rows are more than
    # the few-row kernels take
    assert taken == (2 * 5 if n_streams * batch <= kernels.MAX_ROWS else 0)
    if chain:  # every step as the two C calls, which write the keys and values into the cache's buffers
        assert chained[0] == taken and appended[0] == grouped[0] == 0
    else:
        assert appended[0] == taken and chained[0] == 0  # the keys and values written into the buffers by the step
        assert grouped[0] == 2 * taken  # q, k, v and gate, up as two groups
    assert torch.equal(fast.sequences, own.sequences)
    assert torch.equal(torch.stack(fast.logits), torch.stack(own.logits))


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_the_step_on_narrower_instruction_paths_equals_the_layers_own_forward(tiny_factory, count_calls, count_steps,
                                                                              monkeypatch, isa):
    """Every kernel built for AVX2 (the one-call bfloat16 step with 8-wide SiLU x up) or for plain
    C++ (two calls, SiLU x up in torch), for the modules and the step alike: the step's logits
    are the layers' own forward's bit for bit, float and int8."""
    from parscale.model import norms, quantize

    builds = {name: build_or_skip(library, isa, name) for name, library in (
        ("few-row product", kernels.library), ("int8 kernel", quantize.library), ("norm kernel", norms.library),
        ("decode attention kernel", prefix_attention.kernel_library), ("decode step chain", decode_layer.chain_library))}
    product, int8, norm, attention, chain = builds.values()
    for owner, name, lib in ((kernels, "library", product), (quantize, "library", int8), (norms, "library", norm),
                             (prefix_attention, "kernel_library", attention), (decode_layer, "chain_library", chain)):
        monkeypatch.setattr(owner, name, lambda flags=(), lib=lib: lib)
    monkeypatch.setattr(decode_layer, "_libraries", decode_layer._libraries.__wrapped__)  # not the native builds kept
    chained = count_steps("_chained")
    for quantized in (None, 16):
        model = _model(tiny_factory, 2, torch.bfloat16, int8=quantized)
        ids, mask = _padded_batch(3)
        chained[0] = 0
        fast, own, taken = _with_and_without_the_step(model, ids, mask, 5, count_steps("_step"))
        assert taken == 2 * 4 and chained[0] == taken, (isa, quantized)
        assert torch.equal(torch.stack(fast.logits), torch.stack(own.logits)), (isa, quantized)
        whole = decode_layer.exp_for_silu(chain) is not None
        assert whole == (isa == "avx2" and "avx2" in cpu_flags()), isa


def test_steps_past_the_cache_room_and_a_cache_of_its_own_take_update(tiny_factory, count_calls, count_steps):
    """When a step's keys fill the buffers, the cache's own `update` grows them (and the steps
    after append in place again); a cache class with its own `update` always gets it called.
    Both bit for bit as the layer's own forward."""
    from transformers import DynamicCache

    from parscale.model import kv_cache

    _libraries_or_fail()
    model = _model(tiny_factory, 2, torch.bfloat16)
    ids, mask = _padded_batch(1)
    appended, steps = count_calls(decode_layer, "rotary_append"), count_steps("_step")
    chained = count_steps("_chained")
    grown = count_calls(kv_cache.GrowingLayer, "_grow")
    new_tokens = 6 + kv_cache.MIN_ROOM + 4  # past the room the prefill's buffers have
    fast, own, taken = _with_and_without_the_step(model, ids, mask, new_tokens, steps)
    assert torch.equal(torch.stack(fast.logits), torch.stack(own.logits))
    assert taken == 2 * (new_tokens - 1) and 0 < chained[0] < taken and appended[0] == 0 and grown[0] > 2 * 2

    class Counting(DynamicCache):
        calls = 0

        def update(self, *args, **kwargs):
            Counting.calls += 1
            return super().update(*args, **kwargs)

    decode_layer.enable(model)
    appended[0] = steps[0] = chained[0] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        got = model.generate(ids, **{NEW_NAME: Counting()}, **kw)
    assert steps[0] == 2 * 4 and appended[0] == chained[0] == 0 and Counting.calls == 2 * 5
    assert torch.equal(torch.stack(got.logits), torch.stack(fast.logits[:5]))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])  # qwen2: bfloat16 q/k/v biases into the int8 kernel
def test_other_families_and_int8_equal_the_layers_own_forward(tiny_factory, count_calls, count_steps, monkeypatch,
                                                              family):
    _libraries_or_fail(int8=True)
    grouped, chained = count_calls(decode_layer, "_grouped"), count_steps("_chained")
    for int8, chain in itertools.product((None, 16, 8), (True, False)):  # 8: int8 activations (VNNI's own kernel)
        monkeypatch.setattr(decode_layer, "use_chain", chain)
        model = _model(tiny_factory, 2, torch.bfloat16, family, int8=int8)
        ids, mask = _padded_batch(3)
        grouped[0] = chained[0] = 0
        fast, own, taken = _with_and_without_the_step(model, ids, mask, 5, count_steps("_step"))
        # q/k/v and gate/up as groups, in the two C calls or from Python
        assert taken == 2 * 4 and (chained[0], grouped[0]) == ((taken, 0) if chain else (0, 2 * taken)), (family, int8)
        assert torch.equal(torch.stack(fast.logits), torch.stack(own.logits)), (family, int8, chain)


def cpu_flags() -> list[str]:
    from parscale.machine import cpu_info

    return cpu_info()["flags"]


def _bfloat16_bits_equal(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool(((got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())).all())


@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("n", [1, 15, 17, 2816 * 3, 65536 + 5])
def test_silu_times_up_in_c_equals_torch_for_every_bfloat16_gate(n, isa):
    """csrc/decode_step.cpp's bfloat16 SiLU x up (the one-call step's, with torch's own Sleef
    exp of its width: 16 values at a time with AVX-512, 8 with AVX2) against `F.silu(gate) * up`
    bit for bit: every one of the 65536 bfloat16 values as gate (with n above 65536), partial
    last groups (n not a multiple of 8 or 16), one thread and the parallel loop (8192 values or
    more), infinities and NaNs among the ups."""
    lib = build_or_skip(decode_layer.chain_library, isa, "decode step chain")
    flags = cpu_flags()
    width = lib.parscale_has_silu()
    assert width == (16 if isa == "native" and "avx512f" in flags else 8 if "avx2" in flags else 0)
    if not width:
        pytest.skip("no AVX2: the bfloat16 SiLU x up is built for AVX-512 and AVX2")
    exp = decode_layer.exp_for_silu(lib)
    assert exp is not None  # torch's Sleef exp found, and the load-time check of all 65536 values passed
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gate = every.repeat(2)[:n].contiguous() if n > 65536 else every[torch.randperm(65536)[:n]].contiguous()
    gen = torch.Generator().manual_seed(n)
    up = (torch.randn(n, generator=gen) * 4).to(torch.bfloat16)
    up[::97] = float("inf")
    up[1::101] = float("nan")
    want = torch.nn.functional.silu(gate) * up
    for threads in (1, 2):
        got = torch.empty_like(want)
        lib.parscale_silu_mul_bf16(gate.data_ptr(), up.data_ptr(), got.data_ptr(), n, exp, threads)
        assert _bfloat16_bits_equal(got, want), (n, threads, width)


def test_bfloat16_steps_are_one_c_call_with_avx2_or_avx512(tiny_factory, count_calls, count_steps, monkeypatch):
    """On a CPU with AVX2 or AVX-512 a bfloat16 layer's step is the one-call chain (front, SiLU x
    up, back in C: `_Chain.whole`), float32 the two calls with SiLU x up in torch; both bit for
    bit as the layer's own forward (see the test above, which runs both)."""
    _libraries_or_fail()
    require_kernel(decode_layer.chain_library(), "decode step chain")
    if "avx2" not in cpu_flags():
        pytest.skip("the one-call step is built for AVX-512 and AVX2")
    layouts, real = [], decode_layer._layout
    monkeypatch.setattr(decode_layer, "_layout", lambda *a: layouts.append(real(*a)) or layouts[-1])
    for dtype, whole in ((torch.bfloat16, True), (torch.float32, False)):
        layouts.clear()
        model = _model(tiny_factory, 2, dtype)
        ids, mask = _padded_batch(3)
        fast, own, taken = _with_and_without_the_step(model, ids, mask, 4, count_steps("_step"))
        assert taken == 2 * 3 and len(layouts) == 2, dtype  # two layers' plans, found at the first decode step
        assert all((layout.chain.whole is not None) == whole for layout in layouts), dtype
        assert torch.equal(torch.stack(fast.logits), torch.stack(own.logits)), dtype


def test_float32_tokens_equal_the_stock_path_and_beam_search_too(tiny_factory, count_calls, count_steps):
    """Against the stock path (every kernel off: transformers' own modules and ops) the step keeps
    the greedy tokens, with logits within float32 rounding; beam search reorders the cache between
    steps and keeps its sequences."""
    _libraries_or_fail()
    model = _model(tiny_factory, 4, torch.float32)
    ids, mask = _padded_batch(3)
    steps = count_steps("_step")
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        fast = model.generate(ids, **kw)
        beams = model.generate(ids[1:2], attention_mask=mask[1:2], max_new_tokens=5, num_beams=3, do_sample=False)
        used = steps[0]
        model.use_fast_kernels(False)
        stock = model.generate(ids, **kw)
        stock_beams = model.generate(ids[1:2], attention_mask=mask[1:2], max_new_tokens=5, num_beams=3, do_sample=False)
    assert used == 2 * 5 + 2 * 4 and steps[0] == used  # 3 beams x 4 streams: 12 rows
    assert torch.equal(fast.sequences, stock.sequences) and torch.equal(beams, stock_beams)
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(stock.logits), rtol=1e-5, atol=1e-5)


def test_bfloat16_beam_search_equals_the_layers_own_forward_bit_for_bit(tiny_factory, count_calls, count_steps):
    """Beam search reorders the cache between steps (the step after a reorder appends through the
    cache's `update`, the next ones in C again): sequences and beam scores of the step as those
    of the layers' own forward, bit for bit, in bfloat16 (the one-call step on AVX-512)."""
    _libraries_or_fail()
    model = _model(tiny_factory, 2, torch.bfloat16)
    ids, mask = _padded_batch(3)
    steps, chained = count_steps("_step"), count_steps("_chained")
    kw = dict(attention_mask=mask[1:2], max_new_tokens=6, num_beams=3, do_sample=False, return_dict_in_generate=True,
              output_scores=True)
    with torch.no_grad():
        fast = model.generate(ids[1:2], **kw)
        taken, in_c = steps[0], chained[0]
        decode_layer.enable(model, False)
        own = model.generate(ids[1:2], **kw)
    assert taken == 2 * 5 and steps[0] == taken and 0 < in_c <= taken
    assert torch.equal(fast.sequences, own.sequences)
    assert torch.equal(torch.stack(fast.scores), torch.stack(own.scores))


def test_the_layers_own_forward_runs_where_the_step_does_not_apply(tiny_factory, count_calls, count_steps):
    """Hooks (a user's, `output_attentions`), autograd, the eager attention kind, the stream
    adapters' hooks, fast kernels off: the step is not taken, and the result is the layer's own."""
    _libraries_or_fail()
    steps = count_steps("_step")
    model = _model(tiny_factory, 2, torch.float32)
    ids, mask = _padded_batch(3)
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        model.generate(ids, **kw)
        assert steps[0] == 2 * 2
        steps[0] = 0
        handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, i, o: o * 2)
        hooked = model.generate(ids, **kw, return_dict_in_generate=True, output_logits=True)
        assert steps[0] == 2  # layer 0 only, two decode steps
        handle.remove()
        model.generate(ids, **kw, output_attentions=True, return_dict_in_generate=True)
        assert steps[0] == 2
        model.use_fast_kernels(False)
        model.generate(ids, **kw)
        assert steps[0] == 2
        model.use_fast_kernels(True)
    # the hook's doubling is in the logits: compare with the whole stock path under the same hook
    reference = _model(tiny_factory, 2, torch.float32)
    reference.use_fast_kernels(False)
    reference.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, i, o: o * 2)
    with torch.no_grad():
        want = reference.generate(ids, **kw, return_dict_in_generate=True, output_logits=True)
    torch.testing.assert_close(torch.stack(hooked.logits), torch.stack(want.logits), rtol=1e-5, atol=1e-5)
    # autograd: a forward with a cache, outside no_grad
    cache_out = model(ids, attention_mask=mask, use_cache=True)
    cache = cache_out.cache if hasattr(cache_out, "cache") else cache_out.past_key_values
    model(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), **{decode_kwarg(model): cache})
    assert steps[0] == 2


def decode_kwarg(model) -> str:
    from parscale.model.cache_api import cache_argument

    return cache_argument(model)


def test_eager_attention_and_stream_adapters_keep_the_layers_forward(tiny_factory, count_calls, count_steps):
    _libraries_or_fail()
    steps = count_steps("_step")
    base = tiny_factory("qwen2")
    base.set_attn_implementation("eager")
    eager = to_parscale(base, ParScaleConfig(2), seed=1).eval()
    assert eager.config._attn_implementation == "parscale_eager"
    ids, mask = _padded_batch(1)
    with torch.no_grad():
        eager.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert steps[0] == 0
    adapted = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, stream_lora_rank=2), seed=1).eval()
    with torch.no_grad():
        adapted.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert steps[0] == 0


def test_a_model_with_the_step_pickles_copies_and_switches_back(tiny_factory):
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2), seed=0).eval()
    layer = model.model.layers[0]
    fast = type(layer)
    assert fast.__module__ == decode_layer.__name__ and isinstance(layer, fast._stock_class)
    assert decode_layer.__getattr__(fast.__qualname__) is fast  # the lookup pickle makes in a new process
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (loaded, copy.deepcopy(model)):
        assert type(other.model.layers[0]) is fast
        assert other.state_dict().keys() == model.state_dict().keys()
    model.use_fast_kernels(False)
    assert type(model.model.layers[0]) is fast._stock_class
    with pytest.raises(AttributeError):
        decode_layer.__getattr__("nothing_here")


@pytest.mark.parametrize("n_streams, batch", [(4, 3), (2, 2)])
def test_float_products_the_amx_tiles_would_take_go_through_skinny_linear(tiny_factory, monkeypatch, n_streams, batch):
    """Where the AMX tiles take a bfloat16 product (`kernels._use_amx`: from AMX_MIN_ROWS rows on a
    CPU with them; stood in for here, the tiles' result by F.linear), the step hands that product
    to `kernels.skinny_linear` and runs q/k/v and gate/up one by one; below those rows, the groups."""
    import torch.nn.functional as F

    _libraries_or_fail()
    lib = decode_layer._libraries(False)[0]
    monkeypatch.setattr(lib, "amx", True, raising=False)
    monkeypatch.setattr(kernels, "_use_amx", lambda lib, rows, k, n: rows >= kernels.AMX_MIN_ROWS)
    tiles = []
    monkeypatch.setattr(kernels, "skinny_linear", lambda x, w, b, lib: tiles.append(x.shape[0]) or F.linear(x, w, b))
    grouped, chained = [], []
    real, real_chained = decode_layer._grouped, decode_layer._chained
    monkeypatch.setattr(decode_layer, "_grouped", lambda group, *a: grouped.append(1) or real(group, *a))
    monkeypatch.setattr(decode_layer, "_chained", lambda *a: chained.append(1) or real_chained(*a))
    model = _model(tiny_factory, n_streams, torch.bfloat16)
    ids, mask = _padded_batch(batch)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    rows = n_streams * batch
    if rows >= kernels.AMX_MIN_ROWS:  # two layers, two decode steps, seven products each
        assert not grouped and not chained and tiles.count(rows) == 2 * 2 * 7
    else:  # the groups, in the two C calls
        assert len(chained) == 2 * 2 and rows not in tiles


def test_rows_beyond_the_few_row_kernels_take_the_layers_forward(tiny_factory, count_calls, count_steps):
    _libraries_or_fail()
    steps = count_steps("_step")
    model = _model(tiny_factory, 8, torch.float32)
    ids = torch.randint(2, 97, (kernels.MAX_ROWS // 8 + 1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)
    assert steps[0] == 0



@pytest.mark.parametrize("family, window", [("mistral", dict(sliding_window=4)),
                                            ("qwen2", dict(use_sliding_window=True, sliding_window=4,
                                                           max_window_layers=0))])
def test_a_sliding_window_takes_the_layers_forward(tiny_factory, count_calls, count_steps, family, window):
    _libraries_or_fail()
    steps = count_steps("_step")
    model = to_parscale(tiny_factory(family, **window), ParScaleConfig(2), seed=1).eval()
    ids, mask = _padded_batch(1)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)  # the cache's window layers
        # a cache made without the config has plain layers: the layer's own window must be seen
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                       **{decode_kwarg(model): DynamicCache()})
    assert steps[0] == 0


def test_the_layout_is_found_once_per_cache_and_again_after_any_new_hook(tiny_factory, count_calls, count_steps):
    """The checks run at a cache's first decode step per layer and are reused while the cache is the
    same object; a hook registered between two steps of one cache (here on an MLP projection,
    doubling its output) is seen at the next step, which then equals the layer's own forward."""
    from parscale.model.cache_api import cache_argument, output_cache

    _libraries_or_fail()
    layouts, steps = count_calls(decode_layer, "_layout"), count_steps("_step")
    model = _model(tiny_factory, 2, torch.float32)
    ids, mask = _padded_batch(3)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert layouts[0] == 2 and steps[0] == 2 * 3  # two layers, three decode steps
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert layouts[0] == 4  # a new cache

        def decode(net, hook: bool):
            """The prompt, then two steps by hand on one cache; the hook goes in between."""
            out = net(ids, attention_mask=mask, use_cache=True)
            cache, logits, full = output_cache(out), [], mask
            token = out.logits[:, -1:].argmax(-1)
            for step in range(2):
                if step == 1 and hook:
                    handle = net.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, i, o: o * 2)
                full = torch.cat([full, torch.ones_like(full[:, :1])], dim=1)
                out = net(token, attention_mask=full, **{cache_argument(net): cache}, use_cache=True)
                logits.append(out.logits[:, -1])
                token = out.logits[:, -1:].argmax(-1)
            if hook:
                handle.remove()
            return torch.stack(logits)

        layouts[0] = steps[0] = 0
        got = decode(model, hook=True)
        assert layouts[0] == 2 + 2 and steps[0] == 2 + 1  # found again after the hook; layer 1 then hooked
        decode_layer.enable(model, False)
        want = decode(model, hook=True)
        unhooked = decode(model, hook=False)
    assert torch.equal(got, want) and not torch.equal(got[1], unhooked[1])


def test_quantize_int8_drops_the_layouts_that_name_the_float_layers(tiny_factory):
    _libraries_or_fail(int8=True)
    model = _model(tiny_factory, 2, torch.float32)
    ids, mask = _padded_batch(1)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert all(layer.__dict__.get("_parscale_plan") is not None for layer in model.model.layers)
        model.quantize_int8()
        assert not any("_parscale_plan" in layer.__dict__ for layer in model.model.layers)


def test_hooks_on_the_layer_itself_run_as_they_would(tiny_factory, count_calls, count_steps):
    """The fast class's `__call__` skips `nn.Module.__call__` only where no hook is there to run:
    a forward hook and a pre-hook on a layer run at every call, prefill and decode steps alike."""
    _libraries_or_fail()
    steps = count_steps("_step")
    model = _model(tiny_factory, 2, torch.float32)
    ids, mask = _padded_batch(1)
    seen = {"pre": 0, "post": 0}
    layer = model.model.layers[0]
    layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("pre", seen["pre"] + 1))
    layer.register_forward_hook(lambda m, a, o: seen.__setitem__("post", seen["post"] + 1))
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert seen == {"pre": 4, "post": 4}  # the prefill and three decode steps
    assert steps[0] == 3  # layer 1 only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen3_heads_normalised_before_the_rotation_equal_the_layers_own_forward(count_calls, count_steps, dtype):
    """Qwen3 normalises each head of q and k (`q_norm`, `k_norm`) before the rotary embedding;
    the step does the same through the norm kernel, bit for bit the layer's own forward."""
    _libraries_or_fail()
    model = to_parscale(_qwen3(), ParScaleConfig(2), seed=1).to(dtype).eval()
    ids, mask = _padded_batch(3)
    fast, own, taken = _with_and_without_the_step(model, ids, mask, 5, count_steps("_step"))
    assert taken == 2 * 4
    assert torch.equal(torch.stack(fast.logits), torch.stack(own.logits))


def test_a_prefix_encoder_model_equals_the_layers_own_forward(tiny_factory, count_calls, count_steps):
    """With a prefix encoder the prefixes are computed again at every forward (`streams`): the
    same values each time in inference, so the step's layout may keep the first step's."""
    _libraries_or_fail()
    model = to_parscale(tiny_factory("qwen2", seed=3), ParScaleConfig(2, prefix_mlp_hidden=16), seed=1).eval()
    ids, mask = _padded_batch(3)
    fast, own, taken = _with_and_without_the_step(model, ids, mask, 5, count_steps("_step"))
    assert taken == 2 * 4
    assert torch.equal(torch.stack(fast.logits), torch.stack(own.logits))
