"""Weight-only int8 for CPU decoding: an opt-in that reads a quarter of the float32 weight bytes.

`quantize_int8(module)` replaces the plain `nn.Linear` layers of any module tree (the decode
kernel's `SkinnyLinear` included) by `Int8Linear`: symmetric int8 weights per output row
(scale = max|w_row| / 127, so |w - q * scale| <= scale / 2 for every element), float32
scales, the bias kept as it was. `ParScaleForCausalLM.quantize_int8()` applies it to the
backbone and the lm_head (not to a head tied to the embeddings, nor to the stream parameters:
the prefixes and the aggregation MLP keep their dtype).

Decoding with few rows on the CPU takes `csrc/int8_linear.cpp`, the skinny kernel's scheme (built
at first use like `kernels`): on AVX2 and AVX-512, integer products of int8 weights with the
activations rounded to int16 per row (AVX-512 VNNI's vpdpwssd where the CPU has it); in plain
C++, or for a row holding a NaN or an infinity, int8 widened to float32. On a CPU with AVX-512
VNNI the int8 weights are stored in tiles of 16 output rows (`tile_weight`): each 64-byte line
holds four columns of 16 rows, so that one multiply-add takes a line and four values of a row
of x and sums straight into the 16 outputs; with 8 rows of x (P = 8) the products then take
1.2-1.4x the time of one row, where rows took 1.4-2.4x (benchmarks/README.md has the numbers).
`qweight` is then 4-D ([ceil(N / 16), ceil(K / 4), 16, 4]); `Int8Linear.weight` and
`weight_rows` give rows either way.
`quantize_int8(..., activation_bits=8)` rounds the activations to int8 per row instead, on
every path (W8A8, dynamic per token): AVX-512 VNNI's vpdpbusd then does 64 multiply-adds per
instruction on the weights as they lie, twice the int16 path's, for the many rows of many
streams; the accuracy cost is larger (docs/model.md). torch's own `torch._weight_int8pack_mm` does the same product, but on
the issue's workload (48 matrices of 2816 x 1024, M = 1-8 rows, one thread, best of 5,
benchmarks/int8_product.py) it took 35-81 ms with bfloat16 activations and 308-2419 ms with
float32 ones, against 29-60 ms for this kernel with either, so the opt-in uses this kernel
(benchmarks/README.md has the table). Many rows
(prefill), other devices or no compiler take `F.linear` with the weights dequantised to the
activations' dtype, a block of output rows at a time (never a float copy of a whole layer). The
scales stay float32 when the model is cast (`model.to(torch.bfloat16)`, `.half()`): the cast reaches the activations, never the scales. The layers are for inference
only: training or autograd through them raises a `UserError`, and so does saving (quantize
after loading).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from parscale.errors import UserError
from parscale.model import kernels

MAX_ROWS = kernels.MAX_ROWS  # above this the dequantised stock GEMM is compute-efficient
_SOURCE = Path(__file__).resolve().parent / "csrc" / "int8_linear.cpp"
SAVE_FIX = "save before quantize_int8(); quantize after loading"
ACTIVATION_BITS = (16, 8)  # the activations' rounding per row: int16 (near exact) or int8 (W8A8)


# ---------------------------------------------------------------- the kernel
@functools.lru_cache(maxsize=None)
def library(flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled int8 kernel, built once per CPU and torch version like `kernels.library`, or
    None if it cannot be built. `flags` select narrower instruction paths (the tests use them)."""
    return kernels.compiled(_SOURCE, "parscale_int8", flags, _bind, "CPU int8 kernel",
                            "int8 layers use dequantised weights")


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.parscale_int8_f32, lib.parscale_int8_bf16):
        # x, M, K, weight, scale, bias, y, N, threads, bits, bias_bf16, tiled
        fn.argtypes = [pointer, size, size, pointer, pointer, pointer, pointer, size, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_int]
        fn.restype = None
    for fn in (lib.parscale_int8_group_f32, lib.parscale_int8_group_bf16, lib.parscale_int8_group_tiled_f32,
               lib.parscale_int8_group_tiled_bf16):
        # x, M, K, G, weights[G], scales[G], biases[G], y, N[G], threads, bits, bias_bf16
        fn.argtypes = [pointer, size, size, size, pointer, pointer, pointer, pointer, pointer, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int]
        fn.restype = None
    lib.parscale_int8_isa.restype = ctypes.c_int
    lib.isa = {5: "avx512-vnni", 4: "avx512-int16", 3: "avx2-int16", 0: "generic"}[lib.parscale_int8_isa()]
    lib.integer = lib.isa != "generic"  # x rounded to int16 per row, exact integer sums (csrc/int8_linear.cpp)
    lib.parscale_int8_tiles.restype = ctypes.c_int
    lib.tiles = bool(lib.parscale_int8_tiles())  # multiplies tiled weights as they lie (others untile them)
    return lib


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                lib: ctypes.CDLL, bits: int = 16) -> torch.Tensor:
    """`F.linear(x, W * scale[:, None], bias)` by the kernel, in x's dtype; x on the CPU, float32
    or bfloat16 (rounded to integers as it is; widened to float32 only on the float32 path, for a
    row with a NaN or an infinity), qweight the int8 W as rows [N, K] or in tiles
    (`tile_weight`), scale [N] float32. `bits` 8 rounds x to int8 per row first
    (`round_activations`), 16 to int16 on the integer paths."""
    n_out, k = scale.numel(), x.shape[-1]
    if scale.dtype != torch.float32 or qweight.dtype != torch.int8:  # the kernel reads 4-byte scales, 1-byte weights
        raise UserError(f"the int8 kernel takes int8 weights and float32 scales, got {qweight.dtype} and {scale.dtype}; "
                        "cast the model before quantize_int8(), or keep Int8Linear's scales float32")
    check_layout(qweight, n_out, k)
    bfloat16 = x.dtype == torch.bfloat16  # then widened and rounded in C++, not by two torch calls
    rows = x if bfloat16 else x.float()
    rows = rows if rows.is_contiguous() else rows.contiguous()  # M K in memory (see kernels.skinny_linear)
    bias = kernel_bias(bias)
    out = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype if bfloat16 else torch.float32)  # ... N
    fn = io_entry(lib, torch.bfloat16 if bfloat16 else torch.float32)
    fn(rows.data_ptr(), rows.numel() // k, k, qweight.data_ptr(), scale.data_ptr(),
       bias.data_ptr() if bias is not None else None, out.data_ptr(), n_out, torch.get_num_threads(), bits,
       bias_bf16(bias), int(is_tiled(qweight)))
    return out.to(x.dtype)


# ---------------------------------------------------------------- the weights' two layouts
TILE_ROWS, TILE_COLUMNS = 16, 4  # a tile's rows, and the columns of each in one 64-byte line


def is_tiled(qweight: torch.Tensor) -> bool:
    return qweight.dim() == 4


def tiled_shape(n_out: int, k: int) -> tuple[int, int, int, int]:
    return (-(-n_out // TILE_ROWS), -(-k // TILE_COLUMNS), TILE_ROWS, TILE_COLUMNS)


def layout_shape(qweight: torch.Tensor, n_out: int, k: int) -> tuple[int, ...]:
    """The shape qweight must have to hold N = n_out rows of K = k columns in its layout."""
    return tiled_shape(n_out, k) if is_tiled(qweight) else (n_out, k)


def check_layout(qweight: torch.Tensor, n_out: int, k: int) -> None:
    """A UserError unless qweight holds N = n_out rows of K = k columns, as rows or in tiles."""
    want = layout_shape(qweight, n_out, k)
    if tuple(qweight.shape) != want or not qweight.is_contiguous():
        raise UserError(f"int8 weights of shape {tuple(qweight.shape)} do not match {n_out} outputs of {k} inputs "
                        f"(expected a contiguous {want}); quantize the layer with quantize_int8() rather than "
                        "setting qweight by hand")


def tile_weight(q: torch.Tensor) -> torch.Tensor:
    """int8 rows [N, K] as tiles [ceil(N / 16), ceil(K / 4), 16, 4]: tile t's line l holds
    columns 4l .. 4l + 3 of its rows 16t .. 16t + 15, zeros past N and K. The layout the AVX-512
    VNNI kernel multiplies (csrc/int8_linear.cpp, "weights in tiles")."""
    n_out, k = q.shape
    padded = F.pad(q, (0, -k % TILE_COLUMNS, 0, -n_out % TILE_ROWS))
    tiles, lines = padded.shape[0] // TILE_ROWS, padded.shape[1] // TILE_COLUMNS
    return padded.view(tiles, TILE_ROWS, lines, TILE_COLUMNS).transpose(1, 2).contiguous()


def weight_rows(qweight: torch.Tensor, k: int, n0: int = 0, n1: int | None = None) -> torch.Tensor:
    """Rows n0 .. n1 of the int8 weights [n1 - n0, k], from either layout (k: the input size,
    which tiles pad)."""
    if not is_tiled(qweight):
        return qweight[n0:n1]
    n1 = qweight.shape[0] * TILE_ROWS if n1 is None else n1
    first = n0 // TILE_ROWS
    block = qweight[first:-(-n1 // TILE_ROWS)]
    rows = block.transpose(1, 2).reshape(block.shape[0] * TILE_ROWS, -1)
    return rows[n0 - first * TILE_ROWS:n1 - first * TILE_ROWS, :k]


def kernel_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias as the kernel reads it: float32 or bfloat16 as it is (the kernel widens bfloat16
    exactly, as `bias.float()` does), any other dtype widened to float32; contiguous."""
    if bias is None:
        return None
    bias = bias if bias.dtype in (torch.float32, torch.bfloat16) else bias.float()
    return bias if bias.is_contiguous() else bias.contiguous()


def bias_bf16(bias: torch.Tensor | None) -> int:
    """The C functions' last argument: 1 where the bias they get is bfloat16."""
    return int(bias is not None and bias.dtype == torch.bfloat16)


def io_entry(lib: ctypes.CDLL, dtype: torch.dtype):
    """The C function for x and y of `dtype` (float32 or bfloat16; int8 weights, float32 scales,
    a float32 or bfloat16 bias as its next to last argument says: `kernel_bias`, `bias_bf16`;
    the last is 1 for tiled weights).
    `decode_layer` calls it directly too."""
    return lib.parscale_int8_bf16 if dtype == torch.bfloat16 else lib.parscale_int8_f32


def group_entry(lib: ctypes.CDLL, dtype: torch.dtype, tiled: bool = False):
    """The C function for a group of int8 products of the same x in one call (x rounded once, one
    parallel loop; each output bit for bit its product alone): `fn(x, M, K, G, weights, scales,
    biases, y, N, threads, bits, bias_bf16)` with ctypes arrays of G pointers (float32 scales;
    biases all float32, or all bfloat16 with bias_bf16 1) and sizes, the outputs [M, N[g]] one
    after another in y; `tiled` for weights in tiles (all of the group's). `decode_layer` calls it."""
    if tiled:
        return lib.parscale_int8_group_tiled_bf16 if dtype == torch.bfloat16 else lib.parscale_int8_group_tiled_f32
    return lib.parscale_int8_group_bf16 if dtype == torch.bfloat16 else lib.parscale_int8_group_f32


# ---------------------------------------------------------------- quantization
def round_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per row and scaled back, in x's dtype: round(x / xs) * xs with
    xs = max|x_row| / 127, the kernel's rounding with `bits` 8 (csrc/int8_linear.cpp computes
    xs and 127 / max|x_row| in float32 as here). For the dequantised path (prefill), so that a
    model with int8 activations computes the same function with few rows and with many. Rows
    with a NaN or an infinity are left as they are, as the kernel leaves them."""
    x32 = x.float()
    peak = x32.abs().amax(dim=-1, keepdim=True)
    has = peak > 0
    step = torch.where(has, peak / 127, torch.ones_like(peak))
    inv = torch.where(has, 127 / peak, torch.zeros_like(peak))
    rounded = torch.round(x32 * inv).clamp_(-127, 127) * step
    return torch.where(torch.isfinite(peak), rounded, x32).to(x.dtype)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], float32 scale [N]): symmetric per output row, scale = max|w_row| / 127.
    An all-zero row gets scale 1 (its int8 values are 0, so it dequantises to zeros)."""
    w = weight.detach().float()
    peak = w.abs().amax(dim=1)  # N
    scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """The float32 weights an int8 layer stands for: q * scale, per row (k: the input size, needed
    for tiled weights)."""
    if is_tiled(qweight):
        if k is None:
            raise UserError("dequantize() of tiled int8 weights needs the input size k; use Int8Linear.weight")
        qweight = weight_rows(qweight, k, 0, scale.numel())
    return qweight.float() * scale[:, None]


def dequantized_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` on the int8 weights dequantised to x's dtype, a block of output rows at a time.

    Prefill (more rows than the kernel takes), other devices and the stock switch need float
    weights for the stock GEMM. A whole layer's copy is transient but large (an lm_head of
    151936 x 896 is 545 MB in float32), so `kernels.blocked_linear` makes it one block of rows
    at a time. bfloat16 activations on a CPU without bfloat16 arithmetic are multiplied in
    float32 and rounded once (as `kernels.upcast_linear`: the stock bfloat16 GEMM is several
    times slower there)."""
    upcast = x.dtype == torch.bfloat16 and x.device.type == "cpu" and kernels.slow_bfloat16_gemm()
    k = x.shape[-1]
    return kernels.blocked_linear(x, lambda n0, n1: dequantize(weight_rows(qweight, k, n0, n1), scale[n0:n1]),
                                  scale.numel(), bias, torch.float32 if upcast else x.dtype)


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights and float32 per-row scales, for inference only.

    Few-row CPU inference (decoding) runs the int8 kernel; anything else (prefill, other
    devices, no compiler, `use_kernel = False`) runs `F.linear` on the weights dequantised to
    the activations' dtype. The output has the activations' dtype. `weight` gives the
    dequantised weights in the original dtype (a copy made on each access), for code that
    reads a layer's dtype, device or shape. `activation_bits` 8 rounds every input row to
    int8 as well (`round_activations`, on both paths).
    """

    use_kernel: bool = True
    activation_bits: int = 16

    def __init__(self, linear: nn.Linear, activation_bits: int = 16, tiled: bool | None = None) -> None:
        super().__init__()
        self.activation_bits = activation_bits
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        q, scale = quantize_weight(linear.weight)
        if tiled if tiled is not None else tiles_pay(linear.weight.device):
            q = tile_weight(q)
        self.register_buffer("qweight", q.to(linear.weight.device))
        self.register_buffer("scale", scale.to(linear.weight.device))
        self.bias = linear.bias  # the same Parameter, in its dtype (or None)
        self.train(linear.training)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.in_features).to(self.dtype)

    def _apply(self, fn, recurse: bool = True):
        """`model.to(torch.bfloat16)`, `.half()`, `.cuda()`: the scales follow the device but stay
        float32 (the kernel reads them as float32, and a bfloat16 scale would round every weight
        row again); `dtype` (the dequantised weights' and `weight`'s) follows the cast."""
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(self.scale.device)  # the float32 values, where fn put the copy
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=self.scale.device)).dtype
        return self

    def extra_repr(self) -> str:
        activations = ", int8 activations" if self.activation_bits == 8 else ""
        tiles = ", tiled" if is_tiled(self.qweight) else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8{activations}{tiles}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or (torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))):
            raise UserError("int8 layers are for inference only: call model.eval() and run under torch.no_grad() "
                            "(generate does), or train the float model and call quantize_int8() after training")
        if self.use_kernel and self._eligible(x):
            lib = library()
            if lib is not None:
                return int8_linear(x, self.qweight, self.scale, self.bias, lib, self.activation_bits)
        if self.activation_bits == 8:
            x = round_activations(x)
        return dequantized_linear(x, self.qweight, self.scale, self.bias)

    def _eligible(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and self.qweight.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and not torch.compiler.is_compiling() and x.dim() > 0
                and 0 < x.numel() <= MAX_ROWS * self.in_features)


def tiles_pay(device: torch.device) -> bool:
    """Whether int8 weights on `device` are stored in tiles: on the CPU where the kernel multiplies
    them as they lie (AVX-512 VNNI)."""
    if torch.device(device).type != "cpu":
        return False
    lib = library()
    return lib is not None and lib.tiles


def quantize_int8(module: nn.Module, skip: set[str] | frozenset[str] = frozenset(), activation_bits: int = 16,
                  tiled: bool | None = None) -> int:
    """Replace the plain `nn.Linear`/`SkinnyLinear` layers of `module` by `Int8Linear`, in place.

    Layers whose qualified name is in `skip`, or that lie under such a name, are left alone,
    as are Linear subclasses other than the decode kernel's (adapter or quantized layers).
    `activation_bits` 8 also rounds the layers' inputs to int8 per row (see the module
    docstring). `tiled` stores the int8 weights in tiles (True) or rows (False); by default in
    tiles where the CPU kernel multiplies them so (`tiles_pay`). Returns the float weight bytes
    replaced minus the int8 bytes that took their place.
    """
    check_activation_bits(activation_bits)
    def skipped(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in skip)

    targets = [(name, m) for name, m in module.named_modules()
               if (type(m) is nn.Linear or isinstance(m, kernels.SkinnyLinear)) and not skipped(name)]
    saved = 0
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        replacement = Int8Linear(linear, activation_bits, tiled)
        before = linear.weight.numel() * linear.weight.element_size()
        saved += before - replacement.qweight.numel() - replacement.scale.numel() * 4
        setattr(parent, attr, replacement)
    return saved


def check_activation_bits(bits) -> None:
    if bits not in ACTIVATION_BITS:
        raise UserError(f"activation_bits={bits!r} is not supported; use 16 (activations rounded to int16, the "
                        "default: almost no accuracy cost) or 8 (int8 activations: faster with many streams on "
                        "AVX-512 VNNI, less accurate)")


def enable(module: nn.Module, enabled: bool = True) -> int:
    """Let the `Int8Linear` layers of `module` take the int8 kernel (or always the dequantised
    `F.linear`); returns how many there are."""
    count = 0
    for m in module.modules():
        if isinstance(m, Int8Linear):
            m.use_kernel = enabled
            count += 1
    return count


def check_savable(module: nn.Module) -> None:
    """A UserError if `module` holds int8 layers: their checkpoint could not be loaded back."""
    if any(isinstance(m, Int8Linear) for m in module.modules()):
        raise UserError(f"this model was quantized to int8 and cannot be saved in that form; {SAVE_FIX}")


def int8_bytes(module: nn.Module) -> int:
    """The bytes of the int8 weights and their scales in `module` (not counted by `parameters()`)."""
    return sum(b.numel() * b.element_size() for m in module.modules() if isinstance(m, Int8Linear)
               for b in (m.qweight, m.scale))
