"""The backbone's RMSNorm in one C++ call for decoding on CPU (`csrc/rms_norm.cpp`).

transformers' Llama-family RMSNorm is seven torch calls; with a few rows per decode step their
dispatch is the cost: 31-40 us a call in bfloat16 on an AVX2 EPYC against 12-16 for the kernel,
two calls per layer, 2 ms of a 25-45 ms step saved at P = 1 and P = 8 (`benchmarks/norm.py`,
benchmarks/README.md). It takes the whole tensor up to `MAX_VALUES` values, so Qwen3's per-head
q/k norms take it too. No hook of transformers replaces
a norm's forward without the `kernels` hub package and a hub repository, so this module does
what `kernels.enable` does for `nn.Linear`: `enable(model)` gives each recognised norm module a
subclass of its own class (`isinstance` still holds, parameters and state-dict keys unchanged)
whose forward takes the kernel for CPU inference and the class's own forward otherwise
(autograd, `torch.compile`, other devices, more than `MAX_VALUES` values (a long prefill),
mixed dtypes, no compiler).

A norm is recognised when its class's `forward` is LlamaRMSNorm's compiled code (the same
bytecode, constants and names: Qwen2, Qwen3, Mistral, Mixtral, Phi-3, Granite, DeepSeek-V3...
are generated from it) and it has `weight` and `variance_epsilon`. Gemma's `1 + weight` and
Olmo2's order of operations have other code and keep their forward. The kernel does the stock
arithmetic in float32 in the same order except for the sum of squares, so its results equal the
stock ones to a rounding of the last bit (tested against float64 and the stock forward).
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import re
from pathlib import Path

import torch
from torch import nn

from parscale.model import kernels

_SOURCE = Path(__file__).resolve().parent / "csrc" / "rms_norm.cpp"
# Values per call at most (the kernel runs on one thread): a decode step's P*B rows of the
# hidden size, and Qwen3's per-head q/k norms (P*B*heads rows of the head size: 16384 values at
# P = 8 with 16 heads of 128). A long prefill takes torch's multithreaded forward.
MAX_VALUES = 1 << 16


@functools.lru_cache(maxsize=None)
def library(flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """`csrc/rms_norm.cpp`, built at first use like the decode matmul (`kernels.compiled`)."""
    return kernels.compiled(_SOURCE, "parscale_rms_norm", flags, _bind, "CPU RMSNorm kernel",
                            "norms use transformers' forward")


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.parscale_rms_norm_f32, lib.parscale_rms_norm_bf16):
        fn.argtypes = [pointer, size, size, pointer, ctypes.c_float, pointer]
        fn.restype = None
    return lib


@functools.lru_cache(maxsize=None)
def _llama_code():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm.forward.__code__


def is_llama_rms_norm(module: nn.Module) -> bool:
    """The module computes LlamaRMSNorm's formula (see the module docstring)."""
    forward = getattr(type(module), "_stock_forward", type(module).forward)
    code, ref = getattr(forward, "__code__", None), _llama_code()
    return (code is not None and code.co_code == ref.co_code and code.co_consts == ref.co_consts
            and code.co_names == ref.co_names and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 1 and isinstance(getattr(module, "variance_epsilon", None), float))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, lib: ctypes.CDLL) -> torch.Tensor:
    """LlamaRMSNorm's forward by the kernel; x [..., H] and weight [H] of one dtype on the CPU."""
    rows = x if x.is_contiguous() else x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    fn = lib.parscale_rms_norm_bf16 if x.dtype == torch.bfloat16 else lib.parscale_rms_norm_f32
    hidden = weight.shape[0]
    fn(rows.data_ptr(), rows.numel() // hidden, hidden, weight.data_ptr(), eps, out.data_ptr())
    return out


def _eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """CPU inference (`kernels.cpu_inference`) on at most MAX_VALUES values in float32 or
    bfloat16, x and the weight of one dtype."""
    if not kernels.cpu_inference(x, weight):
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        return False
    if not weight.is_contiguous() or x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        return False
    return 0 < x.numel() <= MAX_VALUES


def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if self.use_kernel and _eligible(hidden_states, weight):
        lib = library()
        if lib is not None:
            return rms_norm(hidden_states, weight, self.variance_epsilon, lib)
    return self._stock_forward(hidden_states)


_FAST = "Fast_"  # the fast classes' qualified names: this prefix and the stock class's, encoded


def encode_class(stock: type, prefix: str = _FAST) -> str:
    """`prefix` + `module:qualname` as one identifier ("_" -> "_u", "." -> "_d", ":" -> "_c"), so
    that pickle can name the class and a module `__getattr__` can rebuild it from the name alone.
    (`decode_layer` names its fast layer classes the same way, with its own prefix.)"""
    path = f"{stock.__module__}:{stock.__qualname__}"
    return prefix + path.replace("_", "_u").replace(".", "_d").replace(":", "_c")


def stock_class(name: str, prefix: str = _FAST) -> type:
    """The stock class an `encode_class` name stands for (AttributeError if it cannot be imported here)."""
    path = re.sub(r"_([udc])", lambda m: {"u": "_", "d": ".", "c": ":"}[m.group(1)], name[len(prefix):])
    module, _, qualname = path.partition(":")
    try:
        stock = importlib.import_module(module)
        for part in qualname.split("."):
            stock = getattr(stock, part)
    except (ImportError, AttributeError) as error:
        raise AttributeError(f"{name!r} names {module}:{qualname}, which cannot be imported here ({error})") from None
    return stock


def subclass(cls: type, forward, module: str, prefix: str = _FAST, **extra) -> type:
    """`cls` with another `forward` (its own kept as `_stock_forward`, the class as `_stock_class`),
    named as `cls` (a model prints as before) and qualified by `encode_class`, so that pickle finds
    it in `module` through that module's `__getattr__` (`torch.save(model)`, `copy.deepcopy` and
    multiprocessing work as before). Used for the norms here and the decoder layers (`decode_layer`,
    which adds a `__call__` through `extra`)."""
    return type(cls.__name__, (cls,), {"forward": forward, "_stock_forward": cls.forward, "_stock_class": cls,
                                       "use_kernel": True, "__module__": module,
                                       "__qualname__": encode_class(cls, prefix), **extra})


def swap_classes(model: nn.Module, recognised, fast, enabled: bool) -> int:
    """Give each module of `model` that `recognised` accepts the class `fast(stock class)`, or its
    stock class back with `enabled=False` (the object and its state stay); returns how many."""
    count = 0
    for module in model.modules():
        if not recognised(module):
            continue
        stock = getattr(type(module), "_stock_class", type(module))
        module.__class__ = fast(stock) if enabled else stock
        count += 1
    return count


@functools.lru_cache(maxsize=None)
def fast_class(cls: type) -> type:
    """`cls` with the kernel's forward (one class per norm class, so that `isinstance` holds)."""
    return subclass(cls, _forward, __name__)


def __getattr__(name: str) -> type:
    """Pickle's lookup of a fast class (PEP 562): rebuilt from the stock class its name encodes."""
    if not name.startswith(_FAST):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return fast_class(stock_class(name))


def enable(model: nn.Module, enabled: bool = True) -> int:
    """Route the recognised RMSNorm modules of `model` through the kernel (or back to their own
    forward with `enabled=False`); returns how many."""
    return swap_classes(model, is_llama_rms_norm, fast_class, enabled)
