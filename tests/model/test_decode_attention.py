"""The decode step's attention (`attention.decode_attention`): one query per row over its stream's
prefix and the cache, against a float64 loop over rows and heads, and in generation."""
from __future__ import annotations

import pytest
import torch

from _isa import ISA_FLAGS, build_or_skip, require_kernel
from parscale.model import decode_layer
from parscale.model import prefix_attention as attention
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import to_parscale

def _flash_split(*args):
    """The CPU path without the C++ kernel: torch's fused attention twice, merged by log-sum-exp."""
    attention.use_kernel = False
    try:
        return attention.decode_attention(*args)
    finally:
        attention.use_kernel = True


def _kernel(*args):
    """The CPU path: `csrc/decode_attention.cpp` (skipped where it cannot be built)."""
    require_kernel(attention.kernel_library(), "decode attention kernel")
    out = attention._decode_attention_kernel(*args)
    assert out is not None, "the kernel did not take these inputs"
    return out


IMPLEMENTATIONS = {"kernel": _kernel, "flash": _flash_split,
                   "matmul": attention._decode_attention_matmul}  # off the CPU, under autograd and compile


def _reference(query, key, value, mask, prefix_k, prefix_v, scaling) -> torch.Tensor:
    """Row by row, head by head, in float64: the row's stream prefix joined with the cache keys
    it sees (bool mask: the visible ones; float mask: added to the scores), softmax, weighted sum."""
    rows, heads, _, dim = query.shape
    n_streams, kv, _, _ = prefix_k.shape
    batch, groups = rows // n_streams, heads // kv
    out = torch.zeros(rows, 1, heads, dim, dtype=torch.float64)
    for row in range(rows):
        stream = row // batch  # rows are stream-major: row = stream * batch + sample
        row_mask = None if mask is None else mask[row if mask.shape[0] > 1 else 0, 0, -1]
        for head in range(heads):
            group = head // groups
            keys, values = key[row, group].double(), value[row, group].double()
            bias = torch.zeros(keys.shape[0], dtype=torch.float64)
            if row_mask is not None and row_mask.dtype == torch.bool:
                keys, values, bias = keys[row_mask], values[row_mask], bias[row_mask]
            elif row_mask is not None:
                bias = row_mask.double()
            keys = torch.cat([prefix_k[stream, group].double(), keys])
            values = torch.cat([prefix_v[stream, group].double(), values])
            bias = torch.cat([torch.zeros(prefix_k.shape[2], dtype=torch.float64), bias])
            scores = keys @ query[row, head, 0].double() * scaling + bias
            out[row, 0, head] = torch.softmax(scores, dim=0) @ values
    return out


def _inputs(n_streams, batch, dtype, mask_kind, length=11, seed=0, kv=2, groups=3, n_prefix=5, dim=16, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    rows = n_streams * batch
    query = (spread * torch.randn(rows, kv * groups, 1, dim, generator=gen)).to(dtype)
    key, value = (torch.randn(rows, kv, length, dim, generator=gen).to(dtype) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(n_streams, kv, n_prefix, dim, generator=gen).to(dtype) for _ in range(2))
    visible = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    for sample in range(1, batch):  # left padding: sample b of every stream starts 2*b columns late
        visible[sample::batch, ..., : 2 * sample] = False
    one_row = torch.ones(1, 1, 1, length, dtype=torch.bool)
    one_row[..., :3] = False  # one mask broadcast over every row
    lowest = torch.finfo(dtype).min
    mask = {"none": None, "bool": visible, "bool_one_row": one_row,
            "float": torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, lowest)}[mask_kind]
    return query, key, value, mask, prefix_k, prefix_v, dim**-0.5


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "bool_one_row", "float", "none"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_streams", [1, 2, 4])  # 1: one stream with a prefix (`prefix_at_p1`)
def test_equals_a_float64_loop_over_rows_and_heads(impl, dtype, mask_kind, batch, n_streams):
    inputs = _inputs(n_streams, batch, dtype, mask_kind)
    got = IMPLEMENTATIONS[impl](*inputs)
    want = _reference(*inputs)
    assert got.shape == want.shape and got.dtype == dtype
    # float32: accumulation error only. bfloat16: the output is rounded to 8 bits of mantissa
    # (2**-8 relative), the fused path's two partial outputs and probabilities once more each.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("isa", list(ISA_FLAGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv, groups, dim, n_prefix, length", [
    (4, 4, 64, 48, 96),  # the decode benchmark's heads; the prefix and the cache in whole blocks of 8 (16) keys
    (2, 7, 24, 3, 13),  # query heads in blocks of 4 and 3, a 16- and an 8-column block of output
    (1, 2, 128, 9, 5),  # fewer cache keys than one block; with AVX-512 two 64-column blocks of output
    (2, 2, 12, 4, 10),  # a head size the vector loops do not take: the plain loops
    (2, 3, 48, 17, 21),  # AVX-512: 16-lane loops (48 = 3 x 16) but not vdpbf16ps (not a multiple of 32)
    (1, 5, 16, 2, 33),  # AVX-512: one 16-column vector per key, 16-key blocks with one key left over
    (2, 4, 96, 31, 1),  # AVX-512: vdpbf16ps over three 32-column steps, one cached key
])
def test_the_kernel_on_other_shapes_equals_the_float64_loop(isa, dtype, kv, groups, dim, n_prefix, length):
    """Queries scaled so the scores spread over tens of units: the kernel's exponential is a
    polynomial, exact to float32 only over the whole range it is used on. Each instruction path
    (`_isa.ISA_FLAGS`): AVX-512 (16 keys a time, bfloat16 scores by `vdpbf16ps`), AVX2, plain C++."""
    lib = build_or_skip(attention.kernel_library, isa, "decode attention kernel")
    query, key, value, mask, prefix_k, prefix_v, scaling = _inputs(
        2, 3, dtype, "bool", length=length, kv=kv, groups=groups, n_prefix=n_prefix, dim=dim, spread=4.0)
    got = attention.call_kernel(query.contiguous(), key, value, attention.additive_mask(mask), prefix_k, prefix_v,
                                scaling, lib)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), _reference(query, key, value, mask, prefix_k, prefix_v, scaling),
                               rtol=tol, atol=tol)


def test_the_kernel_propagates_nan():
    """A NaN in one query head makes that head's output NaN (as torch's softmax does), a NaN in
    one cache key the outputs of the query heads that score it, and nothing else."""
    query, key, *rest = _inputs(2, 1, torch.float32, "none", kv=4, groups=4, dim=64, n_prefix=8, length=16)
    query[1, 5, 0, 3] = float("nan")  # row 1, query head 5
    key[0, 2, 7, 0] = float("nan")  # row 0, KV head 2: query heads 8-11
    got, want = _kernel(query, key, *rest).double(), _reference(query, key, *rest)
    for row, heads in ((1, slice(5, 6)), (0, slice(8, 12))):
        assert torch.isnan(got[row, 0, heads]).all() and torch.isnan(want[row, 0, heads]).all()
        got[row, 0, heads] = want[row, 0, heads] = 0.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_float64_stays_float64():
    inputs = _inputs(2, 3, torch.float64, "bool")
    got = attention.decode_attention(*inputs)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _reference(*inputs), rtol=1e-10, atol=1e-10)


def test_gradients_under_autograd_equal_the_float64_loop():
    """With gradients wanted the matmul path runs: the fused kernel's log-sum-exp carries none."""
    inputs = _inputs(2, 3, torch.float32, "bool")
    leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs[:6]]
    doubles = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in inputs[:6]]
    weights = torch.randn(inputs[0].shape[0], 1, inputs[0].shape[1], inputs[0].shape[3], generator=torch.Generator().manual_seed(1))
    (attention.decode_attention(*leaves, inputs[6]) * weights).sum().backward()
    (_reference(*doubles, inputs[6]) * weights.double()).sum().backward()
    for got, want in zip(leaves, doubles):
        if got.is_floating_point():
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("hidden", ["bool", "float_min", "float_inf"])
def test_a_fully_hidden_cache_leaves_the_prefix(impl, hidden):
    """Not a state decoding reaches (the current token is always visible), but the merge must not
    give an empty cache part any weight, whichever way the mask hides it."""
    query, key, value, _, prefix_k, prefix_v, scaling = _inputs(2, 2, torch.float32, "none")
    visible = torch.ones(4, 1, 1, key.shape[2], dtype=torch.bool)
    visible[1] = False  # row 1 sees no cache key at all
    fill = {"bool": None, "float_min": torch.finfo(torch.float32).min, "float_inf": float("-inf")}[hidden]
    mask = visible if fill is None else torch.zeros(visible.shape).masked_fill(~visible, fill)
    got = IMPLEMENTATIONS[impl](query, key, value, mask, prefix_k, prefix_v, scaling)
    want = _reference(query, key, value, visible, prefix_k, prefix_v, scaling)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_streams", [1, 2, 4])  # 1: `prefix_at_p1`
@pytest.mark.parametrize("path", ["kernel", "flash"])
def test_greedy_generate_equals_the_uncached_argmax_loop(tiny_factory, count_calls, count_steps, monkeypatch, n_streams,
                                                         path):
    """Left-padded batch of 3: every decode step goes through the CPU path (the C++ kernel, or
    torch's fused attention twice without it), and its tokens and logits are those of full
    forwards over the whole sequence (prefill path, no cache)."""
    if path == "kernel":
        require_kernel(attention.kernel_library(), "decode attention kernel")
    monkeypatch.setattr(attention, "use_kernel", path == "kernel")
    config = ParScaleConfig(n_streams, 3, prefix_at_p1=n_streams == 1)
    model = to_parscale(tiny_factory("qwen2"), config, seed=2).eval()
    with torch.no_grad():
        for p in model.model.aggregate_layer[2].parameters() if n_streams > 1 else []:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    ids = torch.randint(2, 97, (3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    calls = count_calls(attention, "call_kernel" if path == "kernel" else "_flash_cpu")
    chained = count_steps("_chained")  # the decode step's two C calls, the kernel's among them
    per_step = 2 if path == "kernel" else 2 * 2  # two layers; the fused attention twice per layer
    new_tokens = 6
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        assert calls[0] + chained[0] == per_step * (new_tokens - 1)
        seq, seq_mask, uncached = ids, mask, []
        for _ in range(new_tokens):
            positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
            uncached.append(model(seq, attention_mask=seq_mask, position_ids=positions).logits[:, -1])
            seq = torch.cat([seq, uncached[-1].argmax(-1, keepdim=True)], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=1)
    assert calls[0] + chained[0] == per_step * (new_tokens - 1)  # the uncached forwards never take the decode path
    assert torch.equal(out.sequences, seq)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(uncached, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_p1_decoding_takes_the_kernel_and_keeps_the_plain_models_tokens(tiny_factory, count_calls, count_steps, family):
    """P = 1 without prefixes (`parscale_plain_sdpa`): every decode step's attention is the C++
    kernel with an empty prefix; tokens are those of the plain transformers model, logits within
    float32 rounding. With the fast kernels off, no kernel call and the plain model bit for bit."""
    require_kernel(attention.kernel_library(), "decode attention kernel")
    plain = tiny_factory(family, seed=3)
    model = to_parscale(tiny_factory(family, seed=3), ParScaleConfig(1)).eval()
    assert model.config._attn_implementation == "parscale_plain_sdpa"
    ids = torch.randint(2, 97, (3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    calls = count_calls(attention, "call_kernel")  # the decode step calls it directly
    chained = count_steps("_chained")  # ... or from C, in its two C calls
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = plain.generate(ids, **kw)
        got = model.generate(ids, **kw)
        assert calls[0] + chained[0] == 2 * 5  # two layers, five decode steps
        model.use_fast_kernels(False)
        stock = model.generate(ids, **kw)
    assert calls[0] + chained[0] == 2 * 5
    assert torch.equal(got.sequences, want.sequences) and torch.equal(stock.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.stack(stock.logits), torch.stack(want.logits))
