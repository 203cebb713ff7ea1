"""Weight-only int8 (`quantize_int8()`): the product, the model against dequantised weights, the refusals."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _isa import ISA_FLAGS, build_or_skip, require_kernel
from parscale.errors import UserError
from parscale.model import kernels, quantize
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import to_parscale


# The int8 kernel has one path more than the others: AVX-512 integer products without VNNI
# (vpmaddwd and an add in place of vpdpwssd), for AVX-512 CPUs that lack it.
INT8_FLAGS = {**ISA_FLAGS, "avx512-no-vnni": ("-mno-avx512vnni",)}


@pytest.fixture(scope="module", params=list(INT8_FLAGS))
def lib(request):
    return build_or_skip(quantize.library, request.param, "int8 kernel", INT8_FLAGS[request.param])


@pytest.fixture(params=["rows", "tiles"])
def lay(request):
    """The int8 weights in either layout the kernel reads: rows [N, K], or tiles of 16 rows
    (`quantize.tile_weight`, what quantize_int8 stores on AVX-512 VNNI); every build takes both."""
    return quantize.tile_weight if request.param == "tiles" else (lambda q: q)


def _reference_dequantised(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8 and back, written out here independently of `quantize`."""
    w = w.double()
    scale = w.abs().max(dim=1, keepdim=True).values / 127
    scale[scale == 0] = 1
    return (w / scale).round().clamp(-127, 127) * scale


def _activation_bound(x: torch.Tensor, w_deq: torch.Tensor) -> torch.Tensor:
    """What rounding x to int16 per row (step max|x_row| / 32767, the integer paths) may move
    each output by: half a step times sum |w|. Zero for the float32 path's exact x."""
    step = x.double().abs().amax(-1, keepdim=True) / 32767
    return step / 2 * w_deq.abs().sum(1)


def _int16_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                     top: int = 32767) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer path written out: x rounded to int16 (`top` 32767) or int8 (127) per row as
    the kernel rounds it (float32 x * (top / peak), half to even), exact integer dot products in
    float64, both scales. Also the same sums of |products|, to bound float32's rounding of the result."""
    peak = x.abs().amax(-1, keepdim=True)  # float32, as in the kernel
    inv = torch.where(peak > 0, top / peak, torch.zeros_like(peak))
    step = torch.where(peak > 0, peak / top, torch.ones_like(peak)).double()
    xq = torch.round(x * inv).clamp(-top, top).double()
    scales = step * scale.double()
    return (xq @ q.double().T) * scales, (xq.abs() @ q.double().abs().T) * scales


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_product_matches_float64_with_dequantised_weights(lib, rows, with_bias, lay):
    # K = 83: tails after the 16- and 8-wide loops; N = 19: rows left after the 8/4/2-row steps.
    gen = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(2, rows, 83, generator=gen), torch.randn(19, 83, generator=gen), torch.randn(19, generator=gen)
    w[3] = 0  # an all-zero row
    q, scale = quantize.quantize_weight(w)
    bias = b if with_bias else None
    got = quantize.int8_linear(x, lay(q), scale, bias, lib)
    w_deq = _reference_dequantised(w)
    want = F.linear(x.double(), w_deq, b.double() if with_bias else None)
    assert got.shape == (2, rows, 19) and got.dtype == torch.float32
    bound = _activation_bound(x, w_deq) if lib.integer else 0
    assert ((got.double() - want).abs() <= bound + 1e-5 * (1 + want.abs())).all()
    assert torch.equal(got[:, :, 3], torch.zeros_like(got[:, :, 3]) + (b[3] if with_bias else 0))


@pytest.mark.parametrize("rows", [1, 3, 8, 11])
@pytest.mark.parametrize("k", [15, 16, 83, 1024, 2100, 4200])
def test_the_integer_path_is_exact_integer_arithmetic(lib, rows, k, lay):
    """On the integer paths y is x's int16 values dotted exactly with the int8 weights: equal
    to float64 integer arithmetic up to float32's rounding of the result (K = 2100 crosses AVX2's
    2048-column passes, 4200 AVX-512's 4096, 15 and 83 leave tails, 11 rows make a second chunk
    of rows)."""
    if not lib.integer:
        pytest.skip(f"the {lib.isa} path multiplies float32 x (test_int8_product_matches_float64_...)")
    gen = torch.Generator().manual_seed(k + rows)
    x, w = torch.randn(rows, k, generator=gen) * torch.logspace(-3, 3, rows)[:, None], torch.randn(21, k, generator=gen)
    x[0, 0] = -x[0].abs().max() * 1.5  # the peak negative: it must round to -32767, not -32768
    q, scale = quantize.quantize_weight(w)
    got = quantize.int8_linear(x, lay(q), scale, None, lib).double()
    want, magnitude = _int16_reference(x, q, scale)
    assert ((got - want).abs() <= 1e-6 * magnitude).all()  # float32 rounds the sums and the scales only


@pytest.mark.parametrize("rows", [1, 4, 5, 8, 11, 16])
@pytest.mark.parametrize("k", [15, 83, 130, 1024, 2100, 4200])
def test_int8_activations_are_exact_integer_arithmetic(lib, rows, k, lay):
    """`bits` 8 (W8A8): every path rounds x to int8 per row (step max|x_row| / 127) and sums the
    integer products exactly (VNNI: vpdpbusd on w + 128, less 128 * sum(x); AVX2 and AVX-512
    without VNNI: the int16 kernels; the plain C++ path: float32 sums of integers): float64 integer arithmetic up to float32's
    rounding. 130 and 15 columns leave tails of the 64-byte steps, 11 rows a second chunk, 4200
    columns two passes at 8 rows (x's 32 KB in L1; VNNI takes off sum(x) of each pass)."""
    gen = torch.Generator().manual_seed(k * rows)
    x, w = torch.randn(rows, k, generator=gen) * torch.logspace(-3, 3, rows)[:, None], torch.randn(21, k, generator=gen)
    x[0, 0] = -x[0].abs().max() * 1.5  # the peak negative: -127
    x[-1, 1] = x[-1].abs().max() * 1.5  # the peak positive: 127
    q, scale = quantize.quantize_weight(w)
    got = quantize.int8_linear(x, lay(q), scale, None, lib, 8).double()
    want, magnitude = _int16_reference(x, q, scale, top=127)
    assert ((got - want).abs() <= 1e-6 * magnitude).all()


def test_int8_activations_give_the_same_bits_on_every_integer_path_and_row_count(lay):
    """The integer paths sum the same int8 values exactly: equal bit for bit across paths (VNNI's
    vpdpbusd kernel and the int16 kernels), and all rows at once (a second chunk of rows at 11)
    equal each row alone."""
    libs = {name: quantize.library(flags) for name, flags in INT8_FLAGS.items()}
    integer = {lib.isa: lib for lib in libs.values() if lib is not None and lib.integer}
    if not integer:
        pytest.skip("no integer path builds on this CPU")
    gen = torch.Generator().manual_seed(12)
    for rows, k in [(8, 83), (6, 1024), (11, 2100)]:
        x, w = torch.randn(rows, k, generator=gen), torch.randn(37, k, generator=gen)
        q, scale = quantize.quantize_weight(w)
        outs = {isa: quantize.int8_linear(x, lay(q), scale, None, lib, 8) for isa, lib in integer.items()}
        first = next(iter(outs.values()))
        assert all(torch.equal(first, out) for out in outs.values()), (rows, k, sorted(outs))
        for lib in integer.values():
            alone = torch.cat([quantize.int8_linear(x[i:i + 1], lay(q), scale, None, lib, 8) for i in range(rows)])
            assert torch.equal(alone, first), (lib.isa, rows, k)


@pytest.mark.parametrize("bits", [16, 8])
def test_bfloat16_x_is_rounded_as_the_float32_widening_of_it(lib, bits, lay):
    """The kernel rounds bfloat16 x to integers as it lies (widened in registers, no float32 copy):
    the same integers as from x widened to float32 first, so the bfloat16 call's outputs are the
    float32 call's rounded to bfloat16, bit for bit (K with a partial vector at the end, 8 rows
    with a zero row)."""
    gen = torch.Generator().manual_seed(bits)
    x = (torch.randn(8, 83, generator=gen) * 3).bfloat16()
    x[5] = 0
    q, scale = quantize.quantize_weight(torch.randn(21, 83, generator=gen))
    bias = torch.randn(21, generator=gen)
    got = quantize.int8_linear(x, lay(q), scale, bias.bfloat16(), lib, bits)
    want = quantize.int8_linear(x.float(), lay(q), scale, bias.bfloat16().float(), lib, bits)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bfloat16_x_with_a_nan_or_infinity_takes_the_float32_path(lib, bad, lay):
    """A bfloat16 row that cannot be rounded to integers sends the call to the float32 path, which
    widens x there: the row propagates as in F.linear, the others are F.linear's of the
    dequantised weights to bfloat16's precision."""
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(3, 40, generator=gen).bfloat16(), torch.randn(6, 40, generator=gen)
    x[1, 7] = bad
    q, scale = quantize.quantize_weight(w)
    got = quantize.int8_linear(x, lay(q), scale, None, lib)
    want = F.linear(x.double(), _reference_dequantised(w))
    assert got.dtype == torch.bfloat16 and not torch.isfinite(got[1]).any()
    torch.testing.assert_close(got[[0, 2]].double(), want[[0, 2]], rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 6, 11])
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16])
def test_a_group_of_int8_products_equals_each_product_alone_bit_for_bit(lib, bits, dtype, rows, bias_dtype, lay):
    """`quantize.group_entry`: q, k and v (or gate and up) of one x in one call, x rounded once and
    one parallel loop, each output [rows, N] one after another, bit for bit the single entry's;
    sizes that leave partial blocks, one product without a bias, float32 or bfloat16 biases, a
    row with a NaN (the float32 path for the whole call) at 6 rows."""
    import ctypes

    gen = torch.Generator().manual_seed(rows + bits)
    k, sizes = 83, (37, 19, 70)
    x = torch.randn(rows, 1, k, generator=gen).to(dtype)
    if rows == 6:
        x[3, 0, 5] = float("nan")
    quantized = [quantize.quantize_weight(torch.randn(n, k, generator=gen)) for n in sizes]
    biases = [torch.randn(n, generator=gen).to(bias_dtype) for n in sizes[:2]] + [None]
    alone = [quantize.int8_linear(x, lay(q), s, b, lib, bits) for (q, s), b in zip(quantized, biases)]
    out = torch.empty(rows * sum(sizes), dtype=dtype)

    def pointers(tensors):
        return (ctypes.c_void_p * 3)(*(t.data_ptr() if t is not None else None for t in tensors))

    tiled = [lay(q) for q, _ in quantized]
    quantize.group_entry(lib, dtype, quantize.is_tiled(tiled[0]))(x.data_ptr(), rows, k, 3, pointers(tiled),
                                     pointers([s for _, s in quantized]), pointers(biases), out.data_ptr(),
                                     (ctypes.c_int64 * 3)(*sizes), 2, bits, int(bias_dtype == torch.bfloat16))
    for got, want in zip(out.split([rows * n for n in sizes]), alone):
        torch.testing.assert_close(got.view(rows, 1, -1), want, rtol=0, atol=0, equal_nan=True)  # bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_a_bfloat16_bias_is_widened_exactly(lib, dtype, rows, lay):
    """The kernel reads a bfloat16 bias as it is (a bfloat16 model's q/k/v biases, with no torch
    conversion per call): the output equals that of the same bias widened by torch beforehand,
    bit for bit, on every instruction path (`lib`)."""
    gen = torch.Generator().manual_seed(rows)
    k, n = 70, 45
    x = torch.randn(rows, 1, k, generator=gen).to(dtype)
    q, s = quantize.quantize_weight(torch.randn(n, k, generator=gen))
    bias = (torch.randn(n, generator=gen) * 3).to(torch.bfloat16)
    got = quantize.int8_linear(x, lay(q), s, bias, lib)
    assert torch.equal(got, quantize.int8_linear(x, lay(q), s, bias.float(), lib)), lib.isa
    assert not torch.equal(got, quantize.int8_linear(x, lay(q), s, None, lib))  # the bias is added at all


def test_every_integer_path_gives_the_same_bits(lay):
    """The AVX2 path (vpmaddwd, 16 columns a step) and the AVX-512 paths (vpdpwssd or vpmaddwd,
    32 columns, masked tails) round x alike and sum exactly: their outputs must be equal bit for
    bit, whatever the rows, tails and passes (2048 columns on AVX2, 4096 with AVX-512)."""
    libs = {name: quantize.library(flags) for name, flags in INT8_FLAGS.items()}
    integer = {lib.isa: lib for lib in libs.values() if lib is not None and lib.integer}
    if len(integer) < 2:
        pytest.skip(f"one integer path builds on this CPU ({sorted(integer)})")
    gen = torch.Generator().manual_seed(11)
    for rows, k in [(1, 83), (3, 1024), (8, 2100), (11, 47)]:
        x, w = torch.randn(rows, k, generator=gen), torch.randn(37, k, generator=gen)
        q, scale = quantize.quantize_weight(w)
        outs = {isa: quantize.int8_linear(x, lay(q), scale, None, lib) for isa, lib in integer.items()}
        first = next(iter(outs.values()))
        assert all(torch.equal(first, out) for out in outs.values()), (rows, k, sorted(outs))


def test_tile_weight_puts_four_columns_of_sixteen_rows_in_each_line():
    """tile_weight against the layout written out as a loop: tile t, line l, row r, column c holds
    q[16t + r, 4l + c], zeros past N and K; weight_rows gives any rows back."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (37, 83), generator=gen, dtype=torch.int8)
    tiles = quantize.tile_weight(q)
    assert tiles.shape == (3, 21, 16, 4) and tiles.dtype == torch.int8 and tiles.is_contiguous()
    for t in range(3):
        for line in range(21):
            for r in range(16):
                for c in range(4):
                    n, k = 16 * t + r, 4 * line + c
                    assert tiles[t, line, r, c] == (q[n, k] if n < 37 and k < 83 else 0), (t, line, r, c)
    for n0, n1 in [(0, 37), (0, 16), (5, 20), (16, 32), (33, 37), (36, 37)]:
        assert torch.equal(quantize.weight_rows(tiles, 83, n0, n1), q[n0:n1]), (n0, n1)


@pytest.mark.parametrize("bits", [16, 8])
def test_tiles_and_rows_give_the_same_bits_on_every_path(bits):
    """Every build reads both layouts (VNNI multiplies the tiles, the others take them back to rows)
    and sums each output exactly in int64 however its passes fall (the tiled int16 path adds
    every 1024 columns, the rows' paths at their own lengths): the same bits for every layout,
    path and row count. 37 outputs leave a partial tile and block; K = 2100 and 4200 cross the
    passes, 83 leaves a partial line."""
    libs = [lib for lib in (quantize.library(flags) for flags in INT8_FLAGS.values()) if lib is not None and lib.integer]
    if not libs:
        pytest.skip("no integer path builds on this CPU")
    gen = torch.Generator().manual_seed(bits)
    for rows, k in [(1, 83), (3, 1024), (8, 2100), (11, 4200), (16, 130)]:
        x, w = torch.randn(rows, k, generator=gen) * 10, torch.randn(37, k, generator=gen)
        q, scale = quantize.quantize_weight(w)
        first = quantize.int8_linear(x, q, scale, None, libs[0], bits)
        for lib in libs:
            for weights in (q, quantize.tile_weight(q)):
                got = quantize.int8_linear(x, weights, scale, None, lib, bits)
                assert torch.equal(got, first), (lib.isa, rows, k, quantize.is_tiled(weights))


def test_int8_activation_sums_do_not_overflow_past_65536_columns(lay):
    """With int8 activations on tiles a lane adds 4 products of up to 255 * 127 per line; 70000
    columns of them (2.3e9) would overflow int32 in one pass: the passes of 65536 columns keep
    it exact."""
    lib = quantize.library()
    if lib is None:
        pytest.skip("the int8 kernel does not build here")
    x = torch.ones(2, 70000)
    x[1] = -1
    q, scale = quantize.quantize_weight(torch.ones(3, 70000))
    got = quantize.int8_linear(x, lay(q), scale, None, lib, 8)
    rtol = 0 if lib.integer else 1e-4
    torch.testing.assert_close(got, torch.tensor([[70000.0] * 3, [-70000.0] * 3]), rtol=rtol, atol=0)


def test_int8_linear_refuses_weights_of_another_shape():
    lib = quantize.library()
    if lib is None:
        pytest.skip("the int8 kernel does not build here")
    q, scale = quantize.quantize_weight(torch.randn(37, 83))
    with pytest.raises(UserError, match=r"shape \(37, 83\) do not match 37 outputs of 84 inputs"):
        quantize.int8_linear(torch.randn(2, 84), q, scale, None, lib)
    with pytest.raises(UserError, match="do not match"):
        quantize.int8_linear(torch.randn(2, 83), quantize.tile_weight(q)[:2], scale, None, lib)


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("rows", [1, 6])
def test_the_integer_sums_do_not_overflow(lib, bits, rows, lay):
    """9000 columns of the largest values: one int32 lane would hold 9000 / 16 * 2 * 32767 * 127
    = 4.7e9 > 2^31 on AVX2 (half that with AVX-512's 32 columns a step); the passes of at most
    2048 (AVX-512: 4096) columns keep every lane below 1.1e9. One row of x takes the longest
    passes (x fits L1 whole), 6 rows shorter ones. With int8 activations (on VNNI w + 128 = 255
    times 127 and -127) a lane holds 4.6e7."""
    x = torch.ones(rows, 9000)
    x[1::2] = -1
    q, scale = quantize.quantize_weight(torch.ones(5, 9000))
    got = quantize.int8_linear(x, lay(q), scale, None, lib, bits)
    # (the plain C++ path adds 9000 products of 127 * 127 in float32: past 2^24, rounded)
    rtol = 1e-4 if bits == 8 and not lib.integer else 1e-6
    want = torch.tensor([[9000.0] * 5, [-9000.0] * 5] * 3)[:rows]
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_with_int8_activations_a_nan_propagates_and_the_other_rows_are_rounded(lib, bad, lay):
    """A row with a NaN or an infinity cannot be rounded to integers: it propagates as in F.linear,
    and the call's other rows keep their int8 rounding."""
    gen = torch.Generator().manual_seed(6)
    x, w = torch.randn(6, 70, generator=gen), torch.randn(9, 70, generator=gen)
    x[2, 5] = bad
    q, scale = quantize.quantize_weight(w)
    got = quantize.int8_linear(x, lay(q), scale, None, lib, 8).double()
    assert not torch.isfinite(got[2]).any()
    others = [0, 1, 3, 4, 5]
    want, magnitude = _int16_reference(x[others], q, scale, top=127)
    assert ((got[others] - want).abs() <= 1e-6 * magnitude).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nan_or_infinity_propagates_as_in_f_linear(lib, bad, lay):
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 40, generator=gen), torch.randn(6, 40, generator=gen)
    x[1, 7] = bad
    q, scale = quantize.quantize_weight(w)
    got = quantize.int8_linear(x, lay(q), scale, None, lib)
    want = F.linear(x.double(), _reference_dequantised(w))
    assert torch.equal(torch.isnan(got[1]), torch.isnan(want[1])) and not torch.isfinite(got[1]).any()
    if not torch.isnan(want[1]).any():  # an infinity: the same signs
        assert torch.equal(got[1], want[1].float())
    torch.testing.assert_close(got[[0, 2]].double(), want[[0, 2]], rtol=1e-5, atol=1e-5)  # other rows: float32 path


def test_bfloat16_activations_give_bfloat16_rounded_once(lib, lay):
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(3, 83, generator=gen).bfloat16(), torch.randn(21, 83, generator=gen)
    q, scale = quantize.quantize_weight(w)
    got = quantize.int8_linear(x, lay(q), scale, None, lib)
    exact = F.linear(x.double(), _reference_dequantised(w))
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5).all()


@pytest.mark.parametrize("rows", [1, 8])
def test_bfloat16_in_and_out_round_as_torch_rounds(lib, rows, lay):
    """bfloat16 x is widened and y rounded in C++: bit for bit the float32 entry's result
    rounded by torch (truncating, or ties broken the wrong way, differs in about half)."""
    gen = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 83, generator=gen).bfloat16(), torch.randn(21, 83, generator=gen), torch.randn(21, generator=gen)
    q, scale = quantize.quantize_weight(w)
    got = quantize.int8_linear(x, lay(q), scale, b, lib)
    want = quantize.int8_linear(x.float(), lay(q), scale, b, lib).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_quantization_error_is_at_most_half_a_step():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 200, generator=gen) * torch.logspace(-4, 2, 64)[:, None]  # rows of very different size
    w[5] = 0
    q, scale = quantize.quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and int(q.abs().max()) <= 127
    err = (w.double() - q.double() * scale.double()[:, None]).abs()
    assert (err <= scale.double()[:, None] / 2 * (1 + 1e-6)).all()
    assert torch.equal(q[5], torch.zeros_like(q[5])) and torch.isfinite(scale).all()
    peak = w.abs().amax(1)
    assert torch.equal(scale, torch.where(peak > 0, peak / 127, torch.ones(64)))


def _model(factory, n_streams: int, seed: int = 0):
    # llama's tiny config is untied, so the lm_head is quantized too; biases on q/k/v via qwen2 below
    model = to_parscale(factory("llama", intermediate_size=72), ParScaleConfig(n_streams, 3), seed=seed)
    with torch.no_grad():  # non-uniform aggregation, so the streams matter
        for p in model.model.aggregate_layer[2].parameters() if n_streams > 1 else []:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 100)))
    kernels.enable(model, False)  # the float kernel is test_kernels.py's subject; here only int8 is compiled
    return model.eval()


def _dequantised_copy(model):
    """The same model in float32 with every quantizable Linear weight replaced by its int8 value."""
    ref = copy.deepcopy(model)
    embedding = ref.get_input_embeddings().weight
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, nn.Linear) and "aggregate_layer" not in name and module.weight is not embedding:
                module.weight.copy_(_reference_dequantised(module.weight).float())
    ref.use_fast_kernels(False)  # the stock F.linear: an independent computation
    return ref


@pytest.mark.parametrize("n_streams", [1, 2, 4, 8])
@pytest.mark.parametrize("batch", [1, 3])
def test_quantized_model_equals_dequantised_float_model(tiny_factory, count_calls, n_streams, batch):
    require_kernel(quantize.library(), "int8 kernel")
    model = _model(tiny_factory, n_streams)
    ref = _dequantised_copy(model)
    aggregate = {n: p.clone() for n, p in model.named_parameters() if "aggregate_layer" in n or "prefix" in n}
    assert model.quantize_int8() is model
    converted = [n for n, m in model.named_modules() if isinstance(m, quantize.Int8Linear)]
    assert "lm_head" in converted and len(converted) == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    for name, param in model.named_parameters():  # stream parameters untouched, in their dtype
        if name in aggregate:
            assert torch.equal(param, aggregate[name]) and param.dtype == torch.float32
    calls = count_calls(quantize, "int8_linear")
    ids = torch.randint(2, 97, (batch, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1:, :2] = 0  # left padding on every row but the first
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                  output_scores=True, pad_token_id=0)
    with torch.no_grad():
        got, want = model.generate(ids, **kwargs), ref.generate(ids, **kwargs)
        logits, ref_logits = model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    assert calls[0] > 0  # decoding took the int8 kernel
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)  # prefill: the dequantised path


def _round_inputs_to_int8(model) -> None:
    """Forward pre-hooks on the reference's quantized layers: each input row rounded to int8
    (step max|x_row| / 127, half to even), written out here in float64 independently of
    `quantize.round_activations` and the kernel."""
    def hook(module, args):
        x = args[0].double()
        step = x.abs().amax(-1, keepdim=True) / 127
        step[step == 0] = 1
        return ((x / step).round().clamp(-127, 127) * step).to(args[0].dtype),

    embedding = model.get_input_embeddings().weight
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "aggregate_layer" not in name and module.weight is not embedding:
            module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("n_streams", [1, 4])
def test_int8_activations_model_equals_the_dequantised_model_with_rounded_inputs(tiny_factory, count_calls, n_streams):
    """`quantize_int8(activation_bits=8)`: decoding (the kernel, 3 or 12 rows) and prefill (the
    dequantised path, `round_activations`) compute the dequantised float model whose quantized
    layers see their inputs rounded to int8 per row."""
    require_kernel(quantize.library(), "int8 kernel")
    model = _model(tiny_factory, n_streams)
    ref = _dequantised_copy(model)
    _round_inputs_to_int8(ref)
    model.quantize_int8(activation_bits=8)
    layers = [m for m in model.modules() if isinstance(m, quantize.Int8Linear)]
    assert layers and {m.activation_bits for m in layers} == {8} and "int8 activations" in repr(layers[0])
    calls = count_calls(quantize, "int8_linear")
    ids = torch.randint(2, 97, (3, 6), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    with torch.no_grad():
        got, want = model.generate(ids, **kwargs), ref.generate(ids, **kwargs)
        logits, ref_logits = model(ids).logits, ref(ids).logits
    assert calls[0] > 0
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    # and the rounding moved the logits (else this test could not tell 8 bits from 16)
    plain = _dequantised_copy(_model(tiny_factory, n_streams))
    with torch.no_grad():
        assert (plain(ids).logits - ref_logits).abs().max() > 1e-3


def test_int8_activations_on_the_kernel_and_the_dequantised_path_agree(lib):
    """One layer, 40 rows at once (the dequantised F.linear after `round_activations`) against
    each row alone (the kernel): the same rounding of x, so float32 rounding apart only."""
    layer = quantize.Int8Linear(nn.Linear(83, 19), activation_bits=8).eval()
    x = torch.randn(40, 83, generator=torch.Generator().manual_seed(8)) * 3
    with torch.no_grad():
        many = layer(x)
        one = torch.cat([quantize.int8_linear(x[i:i + 1], layer.qweight, layer.scale, layer.bias, lib, 8)
                         for i in range(40)])
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 32, "8"])
def test_unsupported_activation_bits_are_refused(tiny_factory, bits):
    model = _model(tiny_factory, 2)
    with pytest.raises(UserError, match=r"activation_bits=.* is not supported; use 16 .* or 8"):
        model.quantize_int8(activation_bits=bits)
    assert not any(isinstance(m, quantize.Int8Linear) for m in model.modules())


def test_bfloat16_model_decodes_in_bfloat16(tiny_factory):
    model = _model(tiny_factory, 2).to(torch.bfloat16).quantize_int8()
    ids = torch.randint(2, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(ids).logits
        step = model.lm_head(torch.randn(1, 1, 32).bfloat16())
    assert out.dtype == torch.bfloat16 and step.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert model.model.aggregate_layer[0].weight.dtype == torch.bfloat16


def _greedy(model, ids):
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    return out.sequences, torch.stack(out.scores).float()  # steps B V


@pytest.mark.parametrize("cast", ["to(bfloat16)", "bfloat16()", "half()"])
def test_a_cast_after_quantize_keeps_float32_scales_and_the_tokens(tiny_factory, count_calls, cast):
    """Casting an int8 model casts its activations, never its scales: the kernel reads them as
    float32, so a bfloat16 scale made every decode step NaN (greedy decoding gave token 0)."""
    if quantize.library() is None:
        pytest.skip("no C++ compiler")
    model = _model(tiny_factory, 2).quantize_int8()
    ids = torch.randint(2, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    want_tokens, want_scores = _greedy(model, ids)
    dtype = torch.float16 if cast == "half()" else torch.bfloat16
    model = model.to(torch.bfloat16) if cast == "to(bfloat16)" else getattr(model, cast[:-2])()
    layers = [m for m in model.modules() if isinstance(m, quantize.Int8Linear)]
    assert {m.scale.dtype for m in layers} == {torch.float32} and {m.dtype for m in layers} == {dtype}
    assert model.lm_head.weight.dtype == dtype and model.model.embed_tokens.weight.dtype == dtype
    calls = count_calls(quantize, "int8_linear")
    tokens, scores = _greedy(model, ids)
    assert calls[0] > 0 or dtype == torch.float16  # bfloat16 decoding took the kernel
    assert torch.equal(tokens, want_tokens)
    # activations rounded to 8 (bfloat16) or 11 (float16) significant bits at every layer: the
    # logits (|x| < 1 here) move by about 2e-3, well inside 1e-2, while the bug gave NaN
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=1e-2)


def test_a_round_trip_through_bfloat16_changes_nothing(tiny_factory):
    """Float32 -> bfloat16 -> float32 is lossless for values that bfloat16 holds, so on such a
    model the int8 model's logits come back bit for bit: the scales were never rounded."""
    model = _model(tiny_factory, 2)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:  # the rotary frequencies too
            tensor.copy_(tensor.bfloat16().float())
    model.quantize_int8()
    ids = torch.randint(2, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    want_tokens, want_scores = _greedy(model, ids)
    tokens, scores = _greedy(model.to(torch.bfloat16).to(torch.float32), ids)
    assert torch.equal(tokens, want_tokens) and torch.equal(scores, want_scores)


def test_the_kernel_refuses_scales_that_are_not_float32(lib):
    q, scale = quantize.quantize_weight(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(UserError, match="float32 scales"):
        quantize.int8_linear(torch.randn(1, 8), q, scale.bfloat16(), None, lib)


def test_tied_head_and_biases(tiny_factory):
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 3), seed=0).eval()  # tied embeddings, q/k/v biases
    kernels.enable(model, False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.bias"):  # initialised to zero: make them count
                param.normal_(generator=torch.Generator().manual_seed(len(name)))
    ref = _dequantised_copy(model)
    model.quantize_int8()
    assert type(model.lm_head) is not quantize.Int8Linear
    assert model.lm_head.weight is model.get_input_embeddings().weight
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, quantize.Int8Linear) and attention.q_proj.bias is not None
    for length in (4, 20):  # 8 rows through the backbone: the kernel; 40: the dequantised F.linear
        ids = torch.randint(2, 97, (1, length), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_prefill_dequantises_a_block_of_rows_at_a_time(tiny_factory, monkeypatch):
    """Prefill runs F.linear on dequantised weights, BLOCK_ROWS output rows at a time (so a
    large lm_head is never copied whole in float): every dequantize call stays within the block,
    and the logits are those of the whole-layer dequantisation (float64 reference model)."""
    model = _model(tiny_factory, 2)
    ref = _dequantised_copy(model).double()
    model.quantize_int8()
    seen = []
    real = quantize.dequantize
    monkeypatch.setattr(quantize, "dequantize", lambda q, s: seen.append(q.shape[0]) or real(q, s))
    monkeypatch.setattr(kernels, "BLOCK_ROWS", 7)  # the head's 97 rows and the MLP's 72: 14 and 11 blocks
    ids = torch.randint(2, 97, (2, 20), generator=torch.Generator().manual_seed(6))  # 40 rows: no kernel
    with torch.no_grad():
        logits = model(ids).logits
        want = ref(ids).logits
    assert seen and max(seen) <= 7 and 97 % 7 in seen  # the last, shorter block of the head
    torch.testing.assert_close(logits.double(), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_prefill_runs_in_float32_where_the_cpu_has_no_bfloat16(monkeypatch):
    """Without bfloat16 arithmetic the dequantised product runs in float32 (the stock bfloat16
    GEMM is several times slower there): exact bfloat16 x times the float32 int8 weights,
    rounded to bfloat16 once."""
    monkeypatch.setattr(kernels, "slow_bfloat16_gemm", lambda: True)
    gen = torch.Generator().manual_seed(9)
    x, w, b = torch.randn(2, 30, 83, generator=gen).bfloat16(), torch.randn(19, 83, generator=gen), torch.randn(19, generator=gen)
    q, scale = quantize.quantize_weight(w)
    got = quantize.dequantized_linear(x, q, scale, b)
    exact = F.linear(x.double(), _reference_dequantised(w), b.double())
    assert got.dtype == torch.bfloat16 and ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5).all()


def test_save_and_training_are_refused(tiny_factory, tmp_path):
    model = _model(tiny_factory, 2).quantize_int8()
    with pytest.raises(UserError, match=r"save before quantize_int8\(\); quantize after loading"):
        model.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    ids = torch.randint(2, 97, (1, 4), generator=torch.Generator().manual_seed(4))
    with pytest.raises(UserError, match="inference only"):
        model(ids)  # autograd: the embeddings require grad
    with pytest.raises(UserError, match="inference only"), torch.no_grad():
        model.train()(ids)


def test_stock_switch_takes_the_dequantised_path(tiny_factory, monkeypatch):
    model = _model(tiny_factory, 2).quantize_int8()
    monkeypatch.setattr(quantize, "int8_linear", lambda *a, **k: pytest.fail("kernel used with kernels off"))
    model.use_fast_kernels(False)
    with torch.no_grad():
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert kernels.enable(model, True) > 0  # the aggregation MLP's Linear layers are still plain


def test_generate_cli_int8_runs(tmp_path, tiny_factory, capsys, monkeypatch, count_calls):
    from _chartok import char_tokenizer

    from parscale.cli.generate import main

    monkeypatch.setattr(kernels, "library", lambda *a: None)  # the float kernel (aggregation MLP) is not built here
    calls = count_calls(quantize, "int8_linear")
    model = _model(tiny_factory, 2)
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    assert main(["--model", str(tmp_path / "model"), "--prompt", "def f(", "--max-new-tokens", "4", "--int8"]) == 0
    assert capsys.readouterr().out.startswith("def f(") and calls[0] > 0
    bits = []
    real = quantize.int8_linear
    monkeypatch.setattr(quantize, "int8_linear", lambda *a: bits.append(a[5]) or real(*a))
    assert main(["--model", str(tmp_path / "model"), "--prompt", "def f(", "--max-new-tokens", "4", "--int8",
                 "--int8-activations"]) == 0
    assert capsys.readouterr().out.startswith("def f(") and bits and set(bits) == {8}
