"""The CPU decode kernel: the product itself, the default path against the stock path, fallbacks."""
from __future__ import annotations

import ctypes
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _isa import ISA_FLAGS, build_or_skip, require_kernel
from parscale.model import kernels, norms
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import to_parscale


@pytest.fixture(scope="module", params=list(ISA_FLAGS))
def lib(request):
    return build_or_skip(kernels.library, request.param, "decode kernel")


@pytest.fixture(scope="module")
def native_lib():
    """The build the model itself uses (-march=native)."""
    return require_kernel(kernels.library(), "decode kernel")  # (the fallback is tested below)


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_product_matches_float64(lib, rows, with_bias):
    # K = 43 leaves a tail after the 8-wide loop; N = 19 leaves rows after the 4/2-row steps.
    gen = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 43, generator=gen), torch.randn(19, 43, generator=gen), torch.randn(19, generator=gen)
    bias = b if with_bias else None
    got = kernels.skinny_linear(x, w, bias, lib)
    want = F.linear(x.double(), w.double(), bias.double() if with_bias else None)
    # float32 sums of 43 products of N(0, 1): rounding error well below 1e-5 relative to ~sqrt(43)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 11])
@pytest.mark.parametrize("k", [256, 43])  # 43: a tail after the 8-, 16- and 32-wide loops
def test_bfloat16_product_rounds_once_from_float32(lib, rows, k):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, k, generator=gen).bfloat16()  # leading dims are kept
    w, b = torch.randn(37, k, generator=gen).bfloat16(), torch.randn(37, generator=gen).bfloat16()
    got = kernels.skinny_linear(x, w, b, lib)
    exact = F.linear(x.double(), w.double(), b.double())  # the bf16 inputs are exact in float64
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, 37)
    # one rounding to bfloat16 (8 bits of mantissa): within half an ulp, 2**-8 relative
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()


@pytest.mark.parametrize("rows", [1, 5, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_rows_summed_over_column_blocks_match_float64(lib, rows, dtype):
    """K = 2829: with several rows, x would not fit in L1, so the kernel sums over blocks of
    columns (the last one with a tail); the result is the plain product's."""
    gen = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 2829, generator=gen), torch.randn(23, 2829, generator=gen), torch.randn(23, generator=gen)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    got = kernels.skinny_linear(x, w, b, lib).double()
    want = F.linear(x.double(), w.double(), b.double())
    if dtype == torch.float32:  # float32 sums of 2829 products of N(0, 1), |y| ~ 53
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    else:  # one rounding to bfloat16
        assert ((got - want).abs() <= want.abs() * 2**-8 + 1e-4).all()


def test_upcast_linear_rounds_once_from_float32(monkeypatch):
    """bfloat16 prefill on a CPU without bfloat16 arithmetic: float32 products of the bfloat16
    values, blocks of weight rows (7 here: 19 rows give a shorter last block), one rounding."""
    monkeypatch.setattr(kernels, "BLOCK_ROWS", 7)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 83, generator=gen).bfloat16()
    w, b = torch.randn(19, 83, generator=gen).bfloat16(), torch.randn(19, generator=gen).bfloat16()
    got = kernels.upcast_linear(x, w, b)
    exact = F.linear(x.double(), w.double(), b.double())
    assert got.dtype == torch.bfloat16 and got.shape == (2, 40, 19)
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5).all()


@pytest.mark.parametrize("slow", [True, False])
def test_bfloat16_prefill_runs_in_float32_only_where_the_cpu_has_no_bfloat16(monkeypatch, count_calls, slow):
    """Many bfloat16 rows (prefill) skip the stock bfloat16 GEMM only on a CPU without bfloat16
    arithmetic, and never under autograd or with the fast kernels switched off."""
    monkeypatch.setattr(kernels, "slow_bfloat16_gemm", lambda: slow)
    calls = count_calls(kernels, "upcast_linear")
    layer = nn.Linear(24, 10).bfloat16()
    kernels.enable(layer)
    x = torch.randn(3, 30, 24).bfloat16()
    with torch.no_grad():
        got = layer(x)
    assert calls[0] == (1 if slow else 0)
    torch.testing.assert_close(got.float(), F.linear(x.float(), layer.weight.float(), layer.bias.float()),
                               rtol=2**-7, atol=1e-2)
    layer(x).sum().backward()  # autograd: the stock op
    with torch.no_grad():
        kernels.enable(layer, False)
        layer(x)  # use_fast_kernels(False): the stock op
    assert calls[0] == (1 if slow else 0) and layer.weight.grad is not None


def _raw_bf16(lib, fn_name: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The kernel's float32 result before the final rounding to bfloat16."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    getattr(lib, fn_name)(x.data_ptr(), x.shape[0], x.shape[1], w.data_ptr(), b.data_ptr(), out.data_ptr(),
                          w.shape[0], torch.get_num_threads())
    return out


@pytest.mark.parametrize("rows", [1, 3, 9])
def test_bfloat16_in_and_out_round_as_torch_rounds(lib, rows):
    """parscale_skinny_bf16_io widens x and rounds y in C++; bit for bit what the float32-in,
    float32-out entry gives followed by torch's own rounding (a truncation, or a tie broken the
    wrong way, differs in about half of the values). A NaN stays NaN."""
    gen = torch.Generator().manual_seed(rows)
    x, w, b = (torch.randn(rows, 83, generator=gen).bfloat16(), torch.randn(29, 83, generator=gen).bfloat16(),
               torch.randn(29, generator=gen).bfloat16())
    x[0, 5] = float("nan")
    want = _raw_bf16(lib, "parscale_skinny_bf16", x.float(), w, b).bfloat16()
    got = torch.empty(rows, 29, dtype=torch.bfloat16)
    lib.parscale_skinny_bf16_io(x.data_ptr(), rows, 83, w.data_ptr(), b.data_ptr(), got.data_ptr(), 29,
                                torch.get_num_threads())
    assert torch.isnan(got[0]).all() and torch.equal(got[1:], want[1:])


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bfloat16_dot_product_rounds_in_cpp_as_torch_rounds(lib, rows):
    """Where the CPU has AVX512-BF16, skinny_linear takes parscale_skinny_bf16_dot_io, which rounds
    y in C++: bit for bit the float32-out entry (bias added in float32) rounded by torch."""
    if not lib.bf16_dot:
        pytest.skip("this build has no AVX512-BF16 path")
    gen = torch.Generator().manual_seed(rows)
    x, w, b = (torch.randn(rows, 83, generator=gen).bfloat16(), torch.randn(29, 83, generator=gen).bfloat16(),
               torch.randn(29, generator=gen).bfloat16())
    x[0, 5] = float("nan")
    want = _raw_bf16(lib, "parscale_skinny_bf16_dot", x, w, b).bfloat16()
    got = kernels.skinny_linear(x, w, b, lib)
    assert got.dtype == torch.bfloat16 and torch.isnan(got[0]).all() and torch.equal(got[1:], want[1:])


@pytest.mark.parametrize("rows", [1, 5, 9, 12, 16])
@pytest.mark.parametrize("k", [64, 1024])
def test_amx_bfloat16_product_matches_float64(native_lib, rows, k):
    if not native_lib.amx:
        pytest.skip("this CPU (or its OS) has no AMX tiles")
    gen = torch.Generator().manual_seed(rows + k)
    x, w = torch.randn(rows, k, generator=gen).bfloat16(), torch.randn(48, k, generator=gen).bfloat16()
    b = torch.randn(48, generator=gen).bfloat16()
    exact = F.linear(x.double(), w.double(), b.double())  # the bf16 inputs are exact in float64
    got = _raw_bf16(native_lib, "parscale_skinny_bf16_amx", x, w, b).double()
    # float32 sums of k exact products: well within 1e-5 of the largest partial sums (~sqrt(k))
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5 * k**0.5)


def test_amx_is_taken_from_nine_rows_where_the_shapes_allow(native_lib, monkeypatch):
    if not native_lib.amx:
        pytest.skip("this CPU (or its OS) has no AMX tiles")
    taken = []
    original = kernels._use_amx
    monkeypatch.setattr(kernels, "_use_amx", lambda *a: taken.append(original(*a)) or taken[-1])
    gen = torch.Generator().manual_seed(0)
    for rows, k, n in ((8, 64, 48), (9, 64, 48), (16, 64, 48), (9, 48, 48), (9, 64, 40)):
        x, w = torch.randn(rows, k, generator=gen).bfloat16(), torch.randn(n, k, generator=gen).bfloat16()
        native_lib.use_amx = True
        fast = kernels.skinny_linear(x, w, None, native_lib)
        native_lib.use_amx = False
        plain = kernels.skinny_linear(x, w, None, native_lib)
        native_lib.use_amx = True
        # both round the same float32 sums (up to summation order) to bfloat16 once
        assert ((fast.double() - plain.double()).abs() <= plain.double().abs() * 2**-7 + 1e-6).all()
    assert taken[::2] == [False, True, True, False, False] and not any(taken[1::2])  # (default, switched off)


def _model(factory, n_streams: int, seed: int = 0):
    model = to_parscale(factory("qwen2", intermediate_size=72), ParScaleConfig(n_streams, 3), seed=seed)
    with torch.no_grad():  # non-uniform aggregation, so the streams matter
        for p in model.model.aggregate_layer[2].parameters() if n_streams > 1 else []:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 100)))
    return model.eval()


@pytest.mark.parametrize("n_streams", [1, 2, 4, 8])
@pytest.mark.parametrize("batch", [1, 3])
def test_default_path_matches_stock_path_in_generate(tiny_factory, native_lib, count_calls, n_streams, batch):
    model = _model(tiny_factory, n_streams)
    ids = _ids(batch, 6)
    mask = torch.ones_like(ids)
    mask[1:, :2] = 0  # left padding on every row but the first
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                  output_scores=True)
    calls = count_calls(kernels, "skinny_linear")
    with torch.no_grad():
        fast = model.generate(ids, **kwargs)
        model.use_fast_kernels(False)
        used = calls[0]
        stock = model.generate(ids, **kwargs)
    assert used > 0 and calls[0] == used  # the kernel ran on the default path, never on the stock one
    assert torch.equal(fast.sequences, stock.sequences)
    for a, b in zip(fast.scores, stock.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_streams", [2, 8])
def test_beam_search_matches_stock_path(tiny_factory, native_lib, n_streams):
    model = _model(tiny_factory, n_streams)
    ids = _ids(2, 4)
    kwargs = dict(max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False,
                  return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        fast = model.generate(ids, **kwargs)
        model.use_fast_kernels(False)
        stock = model.generate(ids, **kwargs)
    assert torch.equal(fast.sequences, stock.sequences)
    torch.testing.assert_close(fast.sequences_scores, stock.sequences_scores, rtol=1e-5, atol=1e-5)


def test_training_never_takes_the_kernel(tiny_factory, native_lib, count_calls):
    model = _model(tiny_factory, 2).train()
    ids = _ids(1, 3)  # 6 rows: few enough for the kernel, were it not for autograd
    calls = count_calls(kernels, "skinny_linear")
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert calls[0] == 0 and grads
    model.zero_grad()
    model.use_fast_kernels(False)
    model(ids, labels=ids).loss.backward()
    for name, grad in grads.items():
        assert torch.equal(grad, dict(model.named_parameters())[name].grad), name
    with torch.no_grad():
        model.use_fast_kernels(True)
        model(ids)
    assert calls[0] > 0  # the same rows without autograd do take it


class _Subclass(torch.Tensor):
    pass


def test_tensor_subclasses_take_the_stock_product(native_lib, count_calls):
    """A subclass (a sharded DTensor for one) may not hold its values where data_ptr points."""
    calls = count_calls(kernels, "skinny_linear")
    layer = nn.Linear(8, 4)
    kernels.enable(layer)
    x = torch.randn(2, 8)
    with torch.no_grad():
        layer(x)
        assert calls[0] == 1
        out = layer(x.as_subclass(_Subclass))
        layer.weight = nn.Parameter(layer.weight.detach().as_subclass(_Subclass), requires_grad=False)
        layer(x)
    assert calls[0] == 1 and type(out) is _Subclass


def test_enable_keeps_weights_and_leaves_subclasses_alone():
    class Adapter(nn.Linear):
        pass

    net = nn.Sequential(nn.Linear(4, 3), Adapter(3, 2))
    keys = list(net.state_dict())
    assert kernels.enable(net) == 1
    assert type(net[0]) is kernels.SkinnyLinear and type(net[1]) is Adapter
    assert list(net.state_dict()) == keys and isinstance(net[0], nn.Linear)


def test_no_compiler_falls_back_to_the_stock_path(tiny_factory, tmp_path, monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached: the build must run
    monkeypatch.setattr(cpp, "load", no_compiler)
    kernels.library.cache_clear()
    norms.library.cache_clear()
    try:
        model = _model(tiny_factory, 2)
        ids = _ids(1, 4)
        with caplog.at_level(logging.WARNING, logger="parscale.model.kernels"), torch.no_grad():
            out = model(ids).logits
            model.use_fast_kernels(False)
            stock = model(ids).logits
        assert kernels.library() is None and norms.library() is None and "unavailable" in caplog.text
        assert torch.equal(out, stock)
    finally:
        kernels.library.cache_clear()  # the next test builds or finds the real library again
        norms.library.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_decode_attention_equals_joined_prefix_and_sdpa(dtype, mask_kind):
    """The split prefix/cache softmax against the direct formula: join, repeat heads, sdpa in float64."""
    from parscale.model.prefix_attention import decode_attention

    gen = torch.Generator().manual_seed(3)
    n_streams, batch, kv, groups, n_prefix, length, dim = 3, 2, 2, 3, 4, 7, 8
    rows = n_streams * batch
    query = torch.randn(rows, kv * groups, 1, dim, generator=gen).to(dtype)
    key, value = (torch.randn(rows, kv, length, dim, generator=gen).to(dtype) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(n_streams, kv, n_prefix, dim, generator=gen).to(dtype) for _ in range(2))
    visible = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    visible[1::batch, ..., :3] = False  # the second sample of every stream is left-padded
    mask = {"none": None, "bool": visible,
            "float": torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)}[mask_kind]
    got = decode_attention(query, key, value, mask, prefix_k, prefix_v, dim**-0.5)

    full_k = torch.cat([prefix_k.repeat_interleave(batch, 0), key], 2).double().repeat_interleave(groups, 1)
    full_v = torch.cat([prefix_v.repeat_interleave(batch, 0), value], 2).double().repeat_interleave(groups, 1)
    keep = torch.cat([torch.ones(rows, 1, 1, n_prefix, dtype=torch.bool), visible], -1)
    if mask_kind == "none":
        keep = torch.ones_like(keep)
    want = F.scaled_dot_product_attention(query.double(), full_k, full_v, attn_mask=keep).transpose(1, 2)
    assert got.shape == (rows, 1, kv * groups, dim) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: the output is rounded once (2**-8 relative)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_a_group_of_products_equals_each_product_alone_bit_for_bit(lib, dtype, rows):
    """`kernels.group_entry`: q, k and v (or gate and up) of one x in one parallel loop, each
    output [rows, N] one after another, equal bit for bit to `io_entry`'s call for that product
    alone (the same blocks, sums and roundings); sizes that leave partial blocks and K tails,
    one product without a bias."""
    gen = torch.Generator().manual_seed(rows)
    k, sizes = 83, (37, 19, 70)
    x = torch.randn(rows, 1, k, generator=gen).to(dtype)
    weights = [torch.randn(n, k, generator=gen).to(dtype) for n in sizes]
    biases = [torch.randn(n, generator=gen).to(dtype) for n in sizes[:2]] + [None]
    alone = []
    for w, b in zip(weights, biases):
        out = torch.empty(rows, 1, w.shape[0], dtype=dtype)
        kernels.io_entry(lib, dtype)(x.data_ptr(), rows, k, w.data_ptr(), b.data_ptr() if b is not None else None,
                                     out.data_ptr(), w.shape[0], 2)
        alone.append(out)
    grouped = torch.empty(rows * sum(sizes), dtype=dtype)
    pointers = ctypes.c_void_p * 3
    kernels.group_entry(lib, dtype)(x.data_ptr(), rows, k, 3, pointers(*(w.data_ptr() for w in weights)),
                                    pointers(*(b.data_ptr() if b is not None else None for b in biases)),
                                    grouped.data_ptr(), (ctypes.c_int64 * 3)(*sizes), 2)
    parts = grouped.split([rows * n for n in sizes])
    for got, want in zip(parts, alone):
        assert torch.equal(got.view(rows, 1, -1), want)
    want = torch.nn.functional.linear(x.double(), weights[0].double(), biases[0].double())
    torch.testing.assert_close(parts[0].view(rows, 1, -1).double(), want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5)  # and the product is the product
