"""A skinny matrix product for decoding on CPU: `nn.Linear` for a few rows, at the memory floor.

Decoding multiplies every weight matrix by P*B rows, a handful. Reading the weights bounds
the step, so P streams should cost almost nothing; but the stock CPU GEMMs (oneDNN/MKL) pack
and block for large matrices, and with 2-16 rows their time grows almost linearly with the
rows, and their bfloat16 matrix-vector product does not read faster than float32. No
maintained library ships a few-row CPU product that streams the weights once, so a small
C++ kernel (`csrc/skinny_linear.cpp`: AVX-512, AVX2/FMA or plain C++, as the CPU allows) is compiled at first use
with `-O3 -march=native` into the parscale cache directory and reused from there.

`enable(model)` turns the model's plain `nn.Linear` modules into `SkinnyLinear`, a subclass
whose forward takes the kernel only for CPU inference with few rows (no autograd, not under
`torch.compile`), and the stock `F.linear` otherwise: on CUDA, in training, for prefill, or
when no compiler is present (logged once). The one exception: bfloat16 inference on an x86 CPU
without bfloat16 arithmetic runs in float32 a block of weight rows at a time (`upcast_linear`),
because the stock bfloat16 GEMM is several times slower there. Parameters and state-dict keys
are unchanged. The kernel sums each dot product in another order than `F.linear`, so its results equal the stock
ones to float tolerance (rounding differences only), not bit for bit.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from parscale.cache import cache_dir
from parscale.machine import cpu_info

logger = logging.getLogger(__name__)

MAX_ROWS = 16  # above this the stock GEMM is compute-efficient; measured in benchmarks/decode.py
AMX_MIN_ROWS = 9  # from here the AMX tiles beat vdpbf16ps (csrc/skinny_linear.cpp, run_amx)
_SOURCE = Path(__file__).resolve().parent / "csrc" / "skinny_linear.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp"]


def _build_name(source: Path, prefix: str, flags: tuple[str, ...]) -> str:
    """A name unique to the source, the flags, torch and the CPU (-march=native is per CPU)."""
    digest = hashlib.sha256()
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]  # included by the sources
    for part in (source.read_bytes(), *headers, " ".join(_FLAGS + list(flags)).encode(), torch.__version__.encode(),
                 platform.machine().encode(), _cpu_model().encode()):
        digest.update(part)
    return f"{prefix}_{digest.hexdigest()[:12]}"


def _cpu_model() -> str:
    """The CPU's name and vector flags: -march=native builds for both, and one name (a virtual
    machine's "AMD EPYC") can stand for CPUs with and without AVX-512."""
    cpu = cpu_info()
    return f"{cpu['name']} {' '.join(cpu['flags'])}"


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` wheel's binary may not be on it (unactivated venv)."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass  # the build then fails and the stock path is used, with a warning


def compiled(source: Path, prefix: str, flags: tuple[str, ...], bind, what: str, fallback: str) -> ctypes.CDLL | None:
    """Build `source` once per CPU and torch version into the cache and load it with `bind`, or
    None (with one warning naming `fallback`) when it cannot be built. One routine for every
    kernel library, so they share the cache layout and the build lock."""
    name = _build_name(source, prefix, flags)
    build = cache_dir("kernels", name)
    built = build / f"{name}.so"
    try:
        try:
            return bind(ctypes.CDLL(str(built)))  # built before (by this or another process)
        except OSError:  # absent, or still being linked by another process: build or wait for it
            pass
        from torch.utils.cpp_extension import load  # takes a lock in `build`, so one process builds

        _ninja_on_path()
        logger.info("compiling the %s once into %s", what, build)
        build.mkdir(parents=True, exist_ok=True)
        load(name, [str(source)], extra_cflags=_FLAGS + list(flags), extra_ldflags=["-fopenmp"], build_directory=str(build),
             is_python_module=False)
        return bind(ctypes.CDLL(str(built)))
    except Exception as error:  # no compiler, no ninja, a failed build: the fallback still works
        logger.warning("the %s is unavailable (%s); %s", what, error, fallback)
        return None


@functools.lru_cache(maxsize=None)
def library(flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled kernel (built once per CPU and torch version), or None if it cannot be built.

    `flags` are extra compiler flags; the tests use them to build and check the narrower
    instruction paths too (e.g. `("-mno-avx512f",)` for AVX2 on an AVX-512 CPU).
    """
    return compiled(_SOURCE, "parscale_skinny", flags, _bind, "CPU decode kernel", "decoding uses the stock matmul")


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C signatures (ctypes would otherwise guess them from the Python values)."""
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.parscale_skinny_f32, lib.parscale_skinny_bf16, lib.parscale_skinny_bf16_dot,
               lib.parscale_skinny_bf16_amx, lib.parscale_skinny_bf16_io, lib.parscale_skinny_bf16_dot_io):
        fn.argtypes = [pointer, size, size, pointer, pointer, pointer, size, ctypes.c_int]
        fn.restype = None
    for fn in (lib.parscale_skinny_group_f32, lib.parscale_skinny_group_bf16_io, lib.parscale_skinny_group_bf16_dot_io):
        # x, M, K, G, weights[G], biases[G], y, N[G], threads
        fn.argtypes = [pointer, size, size, size, pointer, pointer, pointer, pointer, ctypes.c_int]
        fn.restype = None
    lib.parscale_skinny_has_bf16_dot.restype = ctypes.c_int
    lib.parscale_skinny_has_amx.restype = ctypes.c_int
    lib.bf16_dot = bool(lib.parscale_skinny_has_bf16_dot())
    lib.amx = lib.bf16_dot and bool(lib.parscale_skinny_has_amx())  # built for AMX and the OS grants it
    lib.use_amx = True  # the tests and benchmarks switch it off to compare with the vdpbf16ps path
    return lib


def _use_amx(lib: ctypes.CDLL, rows: int, k: int, n_out: int) -> bool:
    """The AMX tiles take whole 32-wide K chunks and 16-row blocks of the weight, and pay off from
    AMX_MIN_ROWS rows (below, the vdpbf16ps path is as fast or faster)."""
    return getattr(lib, "amx", False) and lib.use_amx and rows >= AMX_MIN_ROWS and k % 32 == 0 and n_out % 16 == 0


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def io_entry(lib: ctypes.CDLL, dtype: torch.dtype):
    """The C function for x, weights and y all of `dtype` (float32 or bfloat16) below the AMX
    rows: no torch call around it. bfloat16 x goes to the CPU's bfloat16 dot product as it is
    where there is one; else it is widened, and y rounded, in C++ (two torch calls fewer per
    product, see csrc/skinny_linear.cpp). `decode_layer` calls it directly too."""
    if dtype == torch.float32:
        return lib.parscale_skinny_f32
    return lib.parscale_skinny_bf16_dot_io if getattr(lib, "bf16_dot", False) else lib.parscale_skinny_bf16_io


MAX_GROUP = 4  # products of one x in one group call, float or int8 (csrc/common.h, MAX_GROUP)


def group_entry(lib: ctypes.CDLL, dtype: torch.dtype):
    """`io_entry`'s C function for a group of products of the same x (a layer's q, k and v, or
    its gate and up) in one parallel loop: `fn(x, M, K, G, weights, biases, y, N, threads)` with
    ctypes arrays of G pointers and sizes, the outputs [M, N[g]] one after another in y, each
    equal bit for bit to `io_entry`'s for that product alone. `decode_layer` calls it."""
    if dtype == torch.float32:
        return lib.parscale_skinny_group_f32
    return lib.parscale_skinny_group_bf16_dot_io if getattr(lib, "bf16_dot", False) else lib.parscale_skinny_group_bf16_io


def takes_weights(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """The kernel takes these weights for x of `dtype`: one dtype (float32 or bfloat16), contiguous,
    the bias alike or none. (Where they lie and autograd: `cpu_inference`.)"""
    return (weight.dtype == dtype and dtype in _KERNEL_DTYPES and weight.is_contiguous()
            and (bias is None or (bias.dtype == dtype and bias.is_contiguous())))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lib: ctypes.CDLL) -> torch.Tensor:
    """`F.linear(x, weight, bias)` by the kernel; x and weight on the CPU, float32 or bfloat16.

    Called about a hundred times per decode step, so the Python around the call is kept to
    what it must do: x is used as it lies when it is contiguous, the output is allocated in
    its final shape (each avoided reshape or copy was 1.5-2 us per call)."""
    n_out, k = weight.shape
    shape = (*x.shape[:-1], n_out)
    rows = x if x.is_contiguous() else x.contiguous()  # M K in memory
    m = rows.numel() // k
    bias_ptr = bias.data_ptr() if bias is not None else None
    threads = torch.get_num_threads()
    if weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and _use_amx(lib, m, k, n_out):
        out = torch.empty(shape, dtype=torch.float32)
        lib.parscale_skinny_bf16_amx(rows.data_ptr(), m, k, weight.data_ptr(), bias_ptr, out.data_ptr(), n_out, threads)
        return out.to(torch.bfloat16)
    if x.dtype == weight.dtype and x.dtype in _KERNEL_DTYPES:  # x and y in the weights' dtype (`io_entry`)
        out = torch.empty(shape, dtype=x.dtype)
        io_entry(lib, x.dtype)(rows.data_ptr(), m, k, weight.data_ptr(), bias_ptr, out.data_ptr(), n_out, threads)
        return out
    rows = rows.float()  # float32 x: the same tensor
    fn = lib.parscale_skinny_f32 if weight.dtype == torch.float32 else lib.parscale_skinny_bf16
    out = torch.empty(shape, dtype=torch.float32)
    fn(rows.data_ptr(), m, k, weight.data_ptr(), bias_ptr, out.data_ptr(), n_out, threads)
    return out.to(weight.dtype)


def _tracked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Autograd records this product (training, or an input that needs a gradient): the stock op."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


_PLAIN = (torch.Tensor, nn.Parameter)


def cpu_inference(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Where the C++ kernels may run, one rule for all of them: x a plain CPU tensor and every
    given param (None skipped) a plain tensor or Parameter on the CPU (a tensor subclass, a
    sharded DTensor for one, may not hold its values where `data_ptr` points), no autograd
    recording any of them (the kernels have no gradient), and not under `torch.compile` (a
    compiled graph is better served by the plain ops inductor fuses). Run about 150 times per
    decode step: `is_cpu` rather than `device.type` (0.06 against 0.4 us)."""
    if type(x) is not torch.Tensor or not x.is_cpu:
        return False
    tracked = torch.is_grad_enabled() and x.requires_grad
    for param in params:
        if param is not None:
            if type(param) not in _PLAIN or not param.is_cpu:
                return False
            tracked = tracked or (torch.is_grad_enabled() and param.requires_grad)
    return not tracked and not torch.compiler.is_compiling()


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """CPU inference (`cpu_inference`) with few rows, matching dtypes and contiguous weights."""
    if not cpu_inference(x, weight, bias) or not takes_weights(weight, bias, x.dtype) or x.dim() == 0:
        return False
    return 0 < x.numel() <= MAX_ROWS * weight.shape[1]


BLOCK_ROWS = 1024  # weight rows made float at a time by blocked_linear (4 MB in float32 at K = 1024)


@functools.lru_cache(maxsize=None)
def slow_bfloat16_gemm() -> bool:
    """An x86 CPU without bfloat16 arithmetic (no AVX512-BF16, no AMX-BF16). There the stock
    bfloat16 GEMM is several times slower than float32's: a 512-token prefill of the benchmark's
    16-layer model took 9.1 s in bfloat16 against 1.35 s in float32 on an AVX2 EPYC, plain
    transformers alike (benchmarks/README.md). Other architectures are left to the stock GEMM."""
    cpu = cpu_info()
    return cpu["arch"] in ("x86_64", "AMD64") and not {"avx512_bf16", "amx_bf16"} & set(cpu["flags"])


def blocked_linear(x: torch.Tensor, weight_rows, n_out: int, bias: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """`F.linear(x, W, bias)` computed in `dtype`, the result in x's dtype (rounded once), with the
    rows n0..n1 of W made by `weight_rows(n0, n1)` BLOCK_ROWS at a time: a float copy of a whole
    layer never exists at once, and each block's GEMM is still large enough to run at its speed."""
    rows = x.to(dtype)
    out = x.new_empty(*x.shape[:-1], n_out)
    for n0 in range(0, n_out, BLOCK_ROWS):
        n1 = min(n_out, n0 + BLOCK_ROWS)
        out[..., n0:n1] = F.linear(rows, weight_rows(n0, n1).to(dtype), None if bias is None else bias[n0:n1].to(dtype))
    return out


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` of bfloat16 tensors computed in float32 and rounded to bfloat16 once, a block of
    weight rows at a time (`blocked_linear`). The stock bfloat16 GEMM also sums in float32 and
    rounds once, so the result is the same up to summation order, at float32's speed."""
    return blocked_linear(x, lambda n0, n1: weight[n0:n1], weight.shape[0], bias, torch.float32)


def _upcast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """bfloat16 inference on a CPU whose bfloat16 GEMM is slow (prefill, or decoding without the kernel)."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.dim() == 0:
        return False
    if _tracked(x, weight, bias):
        return False
    if bias is not None and bias.dtype != torch.bfloat16:
        return False
    return not torch.compiler.is_compiling() and slow_bfloat16_gemm()


class SkinnyLinear(nn.Linear):
    """`nn.Linear` that uses the skinny kernel for few-row CPU inference (see the module docstring),
    and computes other bfloat16 CPU inference in float32 where the CPU has no bfloat16 arithmetic."""

    use_kernel: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # each attribute read is a module lookup
        if self.use_kernel and _eligible(x, weight, bias):
            lib = library()
            if lib is not None:
                return skinny_linear(x, weight, bias, lib)
        if self.use_kernel and _upcast(x, weight, bias):
            return upcast_linear(x, weight, bias)
        return F.linear(x, weight, bias)


def enable(model: nn.Module, enabled: bool = True) -> int:
    """Route the plain `nn.Linear` modules of `model` through `SkinnyLinear` (or back); returns how many.

    Only exact `nn.Linear` modules are converted (subclasses such as quantized or adapter
    layers keep their own forward). Nothing happens on a model with no CPU parameters.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear or isinstance(module, SkinnyLinear):
            module.__class__ = SkinnyLinear
            module.use_kernel = enabled
            count += 1
    return count
