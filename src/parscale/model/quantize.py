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
C++, or for a row holding a NaN or an infinity, int8 widened to float32.
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
        # x, M, K, weight, scale, bias, y, N, threads, bits, bias_bf16
        fn.argtypes = [pointer, size, size, pointer, pointer, pointer, pointer, size, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int]
        fn.restype = None
    for fn in (lib.parscale_int8_group_f32, lib.parscale_int8_group_bf16):
        # x, M, K, G, weights[G], scales[G], biases[G], y, N[G], threads, bits, bias_bf16
        fn.argtypes = [pointer, size, size, size, pointer, pointer, pointer, pointer, pointer, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int]
        fn.restype = None
    lib.parscale_int8_isa.restype = ctypes.c_int
    lib.isa = {5: "avx512-vnni", 4: "avx512-int16", 3: "avx2-int16", 0: "generic"}[lib.parscale_int8_isa()]
    lib.integer = lib.isa != "generic"  # x rounded to int16 per row, exact integer sums (csrc/int8_linear.cpp)
    return lib


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                lib: ctypes.CDLL, bits: int = 16) -> torch.Tensor:
    """`F.linear(x, qweight * scale[:, None], bias)` by the kernel, in x's dtype; x on the CPU,
    float32 or bfloat16 (widened to float32), qweight [N, K] int8, scale [N] float32. `bits` 8
    rounds x to int8 per row first (`round_activations`), 16 to int16 on the integer paths."""
    n_out, k = qweight.shape
    if scale.dtype != torch.float32 or qweight.dtype != torch.int8:  # the kernel reads 4-byte scales, 1-byte weights
        raise UserError(f"the int8 kernel takes int8 weights and float32 scales, got {qweight.dtype} and {scale.dtype}; "
                        "cast the model before quantize_int8(), or keep Int8Linear's scales float32")
    bfloat16 = x.dtype == torch.bfloat16  # then widened and rounded in C++, not by two torch calls
    rows = x if bfloat16 else x.float()
    rows = rows if rows.is_contiguous() else rows.contiguous()  # M K in memory (see kernels.skinny_linear)
    bias = kernel_bias(bias)
    out = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype if bfloat16 else torch.float32)  # ... N
    fn = io_entry(lib, torch.bfloat16 if bfloat16 else torch.float32)
    fn(rows.data_ptr(), rows.numel() // k, k, qweight.data_ptr(), scale.data_ptr(),
       bias.data_ptr() if bias is not None else None, out.data_ptr(), n_out, torch.get_num_threads(), bits,
       bias_bf16(bias))
    return out.to(x.dtype)


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
    a float32 or bfloat16 bias as its last argument says: `kernel_bias`, `bias_bf16`).
    `decode_layer` calls it directly too."""
    return lib.parscale_int8_bf16 if dtype == torch.bfloat16 else lib.parscale_int8_f32


def group_entry(lib: ctypes.CDLL, dtype: torch.dtype):
    """The C function for a group of int8 products of the same x in one call (x rounded once, one
    parallel loop; each output bit for bit its product alone): `fn(x, M, K, G, weights, scales,
    biases, y, N, threads, bits, bias_bf16)` with ctypes arrays of G pointers (float32 scales;
    biases all float32, or all bfloat16 with bias_bf16 1) and sizes, the outputs [M, N[g]] one
    after another in y. `decode_layer` calls it."""
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


def dequantize(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weights an int8 layer stands for: q * scale, per row."""
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
    return kernels.blocked_linear(x, lambda n0, n1: dequantize(qweight[n0:n1], scale[n0:n1]), qweight.shape[0], bias,
                                  torch.float32 if upcast else x.dtype)


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

    def __init__(self, linear: nn.Linear, activation_bits: int = 16) -> None:
        super().__init__()
        self.activation_bits = activation_bits
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("qweight", q.to(linear.weight.device))
        self.register_buffer("scale", scale.to(linear.weight.device))
        self.bias = linear.bias  # the same Parameter, in its dtype (or None)
        self.train(linear.training)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale).to(self.dtype)

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
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8{activations}"

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


def quantize_int8(module: nn.Module, skip: set[str] | frozenset[str] = frozenset(), activation_bits: int = 16) -> int:
    """Replace the plain `nn.Linear`/`SkinnyLinear` layers of `module` by `Int8Linear`, in place.

    Layers whose qualified name is in `skip`, or that lie under such a name, are left alone,
    as are Linear subclasses other than the decode kernel's (adapter or quantized layers).
    `activation_bits` 8 also rounds the layers' inputs to int8 per row (see the module
    docstring). Returns the float weight bytes replaced minus the int8 bytes that took their place.
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
        replacement = Int8Linear(linear, activation_bits)
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
