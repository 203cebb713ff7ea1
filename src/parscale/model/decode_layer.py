"""A Llama-family decoder layer's decode step on CPU as a few direct kernel calls.

At batch 1 a decode step's products read the weights at the memory's speed (`kernels`), and
what is left is the eager work around them: in a layer, transformers' attention module makes
about fifty torch calls and module calls for one token (views, the rotary embedding's eleven
ops, the attention interface's lookup), its MLP and the layer a dozen more: 3.1 ms of a 10 ms
bfloat16 step of the decode benchmark's 16-layer model at P = 1 on a 2-core EPYC, 1.5-2.0 ms
less with this step at P = 1 and P = 8 (`benchmarks/decode_split.py --own-layer`,
benchmarks/README.md).

`enable(model)` gives each recognised decoder layer a subclass of its own class (as `norms`
does with RMSNorm: `isinstance` holds, parameters and state-dict keys unchanged) whose forward
runs one decode step as: the norm kernel, the q/k/v products, the rotary embedding of q in
place and of k into the cache (`csrc/decode_attention.cpp`, the stock rounding bit for bit: the
keys rotated and the values copied straight into the free column of a `GrowingLayer`'s
buffers where the cache's `update` is the stock one, else k rotated in place and the cache's
own `update`), the decode attention kernel, the o product, the residual add, the norm kernel,
the gate/up products, SiLU times up, the down product, the residual add; the products' C
functions are called directly (`_product`), q/k/v and gate/up each as one group in one parallel
loop where they are all float or all int8 products (`_grouped`: one fork and join, x rounded
once for int8, and the small k and v projections no longer end a loop of their own; 2.7-2.8% of
a bfloat16 step at P = 1 and 8, 1.5-2.2% of an int8 one). Float products that the AMX tiles
take (9 or more bfloat16 rows on a CPU with them) go one by one (the tiles' entry takes one). The arithmetic is the stock layer's, op for op,
through the same kernels the modules would call; only the Python between them is gone.

Where the kernels allow (both groups, the append into the cache's buffers, the attention
kernel, no per-head norms, no AMX tiles), the step is not even a dozen calls from Python but C
calls that call the same kernels by pointer in the same order (`_chained`,
`csrc/decode_step.cpp`; `use_chain` switches it off): in bfloat16 on AVX-512 or AVX2 one call
per layer, SiLU x up included (computed with torch's own Sleef exp, and checked once per
machine against `F.silu` for all 65536 bfloat16 values: `exp_for_silu`); in float32 two, with SiLU x up in torch
between them (torch's float32 SiLU takes a chunk's last values through another exp, whose
last bit differs). On the decode benchmark's model (Zen 5, 2 threads) the two calls took 6-13%
off a step against the kernels called from Python, the one call 1-7% more. Where a forward's
layers all take the one call, one after the other, `decode_stack` makes their steps a single C
call from the third decode step of a cache on (`use_stack` switches it off).

The checks that decide whether a layer may take the step read about a hundred module
attributes; they run at the first decode step of each cache and their result is kept on the
layer (`_Plan`) while the cache is the same object, no hook has been registered anywhere since,
and the dtype and train/eval mode are unchanged (`quantize_int8` and `enable` drop it). Modules
replaced by hand between two steps of one cache are not seen.

A layer is recognised when its forward, its attention's and its MLP's are the Llama code
(Qwen2, Mistral, Qwen3... are generated from it; compared as bytecode, as `norms` does; Qwen2's
and Mistral's attention add a sliding window, Qwen3's a norm of q and k per head) and its MLP's
activation is SiLU. Every other case takes the layer's own forward: more than one
token (prefill), autograd, `torch.compile`, any hook on the layer or its parts (stream LoRA,
`output_attentions`, user hooks), layers that are not the fast kernels' classes (adapters),
sliding windows, another attention kind (`eager` returns weights), a cache layer other than the
in-place or dynamic one, mixed dtypes, no compiler.
"""
from __future__ import annotations

import ctypes
import functools
import inspect
import sys
import weakref
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module
from torch.utils.hooks import RemovableHandle
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from parscale.model import decode_stack, kernels, norms, prefix_attention, quantize
from parscale.model.cache_api import NEW_NAME, OLD_NAME
from parscale.model.kv_cache import GrowingLayer

_FAST = "FastLayer_"  # the fast layer classes' qualified names (see norms.encode_class)
# our attention kinds whose decode step is `prefix_attention.decode_attention` (with prefixes) or
# the P = 1 kernel (`plain_attention`, without)
_PREFIX_KINDS = ("parscale_sdpa", "parscale_fa2")
_PLAIN_KIND = "parscale_plain_sdpa"
_CACHE_LAYERS = (DynamicLayer, GrowingLayer)  # contiguous keys and values of one layout
_CACHE_UPDATE = Cache.update  # the stock `update`: a cache class with its own keeps it (`decode_step`)
use_chain = True  # the step as one or two C calls where it can (`_chained`); off, its kernels one by one from Python
use_stack = True  # a forward's one-call bfloat16 steps as one C call for all its layers (`decode_stack`)


def _code(function):
    return getattr(inspect.unwrap(function), "__code__", None)  # under the deprecation decorators


def _same_code(function, reference) -> bool:
    code, ref = _code(function), _code(reference)
    return (code is not None and code.co_code == ref.co_code and code.co_consts == ref.co_consts
            and code.co_names == ref.co_names)


@functools.lru_cache(maxsize=None)
def _references() -> dict:
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    # Qwen2's and Mistral's attention pass a sliding window as well (the module's attribute, the
    # config's); the code is otherwise Llama's
    return {"layer": modeling_llama.LlamaDecoderLayer.forward, "mlp": modeling_llama.LlamaMLP.forward,
            "attention": {"llama": modeling_llama.LlamaAttention.forward, "qwen2": modeling_qwen2.Qwen2Attention.forward,
                          "mistral": modeling_mistral.MistralAttention.forward,
                          # Qwen3's normalises q and k per head (`q_norm`, `k_norm`) before the rotation
                          "qwen3": modeling_qwen3.Qwen3Attention.forward},
            "rotary": modeling_llama.apply_rotary_pos_emb}


@functools.lru_cache(maxsize=None)
def _attention_code(cls: type) -> str | None:
    """Which reference attention code `cls` has ("llama", "qwen2", "mistral", "qwen3"), if its module's
    `apply_rotary_pos_emb` is Llama's as well (x * cos + rotate_half(x) * sin); else None."""
    refs = _references()
    rotary = getattr(sys.modules.get(cls.__module__), "apply_rotary_pos_emb", None)
    if rotary is None or not _same_code(rotary, refs["rotary"]):
        return None
    return next((name for name, ref in refs["attention"].items() if _same_code(cls.forward, ref)), None)


def _sliding(attention: nn.Module, code: str) -> bool:
    """The attention uses a sliding window (which the decode step does not apply)."""
    if code == "mistral":
        return getattr(attention.config, "sliding_window", None) is not None
    return getattr(attention, "sliding_window", None) is not None


@functools.lru_cache(maxsize=None)
def _recognised_mlp(cls: type) -> bool:
    return _same_code(cls.forward, _references()["mlp"])


def is_llama_decoder_layer(module: nn.Module) -> bool:
    """The module computes the Llama decoder layer (see the module docstring)."""
    forward = getattr(type(module), "_stock_forward", type(module).forward)
    attention, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
    return (_same_code(forward, _references()["layer"]) and attention is not None and mlp is not None
            and _attention_code(type(attention)) is not None and _recognised_mlp(type(mlp))
            and isinstance(getattr(mlp, "act_fn", None), _SILU))


def _silu_classes() -> tuple[type, ...]:
    from transformers.activations import SiLUActivation

    return (SiLUActivation, nn.SiLU)


_SILU = _silu_classes()


# ----- the kernels the step calls ---------------------------------------------------------------
def rotary_in_place(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, lib: ctypes.CDLL) -> None:
    """`apply_rotary_pos_emb`'s x * cos + rotate_half(x) * sin, written over x: x `[rows, 1, heads * d]`
    contiguous (a product's output), cos and sin `[rows or 1, 1, d]` contiguous, all of one dtype."""
    rows, dim = x.shape[0], cos.shape[-1]
    fn = lib.parscale_rotary_bf16 if x.dtype == torch.bfloat16 else lib.parscale_rotary_f32
    fn(x.data_ptr(), rows, heads, dim, x.stride(0), cos.data_ptr(), sin.data_ptr(), dim if cos.shape[0] > 1 else 0)


def rotary_append(key: torch.Tensor, value: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor,
                  buffers: tuple[torch.Tensor, torch.Tensor], column: int, lib: ctypes.CDLL) -> None:
    """key rotated (as `rotary_in_place`) and value written into column `column` of a
    `GrowingLayer`'s buffers [rows, heads, capacity, d] (contiguous); key and value `[rows, 1,
    heads * d]` contiguous (the products' outputs), cos and sin as for `rotary_in_place`."""
    kbuf, vbuf = buffers
    rows, dim = key.shape[0], cos.shape[-1]
    fn = lib.parscale_rotary_append_bf16 if key.dtype == torch.bfloat16 else lib.parscale_rotary_append_f32
    fn(key.data_ptr(), value.data_ptr(), rows, heads, dim, cos.data_ptr(), sin.data_ptr(), dim if cos.shape[0] > 1 else 0,
       kbuf.data_ptr(), vbuf.data_ptr(), kbuf.stride(0), kbuf.stride(1), column)


def _product_args(linear: nn.Module, dtype: torch.dtype) -> tuple | None:
    """(True for the float kernel or None for int8, weight or int8 weight (rows or tiles), scale,
    bias, the int8 activations' bits, (outputs, inputs)) of a linear
    layer that is one of the fast kernels' (the float kernel with weights of x's dtype, or int8),
    switched on, without hooks (a stream adapter's), its tensors plain and on the CPU; else None."""
    if _hooked(linear) or not getattr(linear, "use_kernel", False):
        return None
    kind = type(linear)
    if kind is kernels.SkinnyLinear:
        weight, bias = linear.weight, linear.bias
        plain = all(t is None or (type(t) in kernels._PLAIN and t.is_cpu) for t in (weight, bias))
        if plain and kernels.takes_weights(weight, bias, dtype):
            # True: the float kernel (`_layout` puts its C function here)
            return True, weight, None, bias, None, tuple(weight.shape)
    elif kind is quantize.Int8Linear and not linear.training:
        buffers = linear._buffers
        weight, scale, bias = buffers["qweight"], buffers["scale"], linear.bias
        if (weight.is_cpu and weight.dtype == torch.int8 and weight.is_contiguous() and scale.dtype == torch.float32
                and scale.is_contiguous() and (bias is None or (bias.is_cpu and bias.is_contiguous()
                                                                and bias.dtype in (torch.float32, torch.bfloat16)))):
            dims = (linear.out_features, linear.in_features)
            if tuple(weight.shape) == quantize.layout_shape(weight, *dims) and scale.shape == (dims[0],):
                return None, weight, scale, bias, linear.activation_bits, dims
    return None


def _norm_args(norm: nn.Module, dtype: torch.dtype) -> tuple | None:
    """(weight, eps) of a norm that takes the kernel (`norms`) for x of `dtype`, without hooks; else None."""
    if type(norm).forward is not norms._forward or not norm.use_kernel or _hooked(norm):
        return None
    weight = norm.weight
    if weight.dtype != dtype or not weight.is_cpu or not weight.is_contiguous() or type(weight) not in kernels._PLAIN:
        return None
    return weight, norm.variance_epsilon


def _product(args: tuple, x: torch.Tensor, libs, threads: int) -> torch.Tensor:
    """x [rows, 1, K] (contiguous) times a layer's weights: the C function `kernels.skinny_linear`
    or `quantize.int8_linear` would call (`kernels.io_entry`, `quantize.io_entry`) called
    directly (their Python around the call is 1.5-3.5 us, seven products per layer and step),
    or `skinny_linear` itself where the AMX tiles may take the rows."""
    entry, weight, scale, bias, bits, (n_out, k) = args
    rows = x.shape[0]
    if scale is None and x.dtype == torch.bfloat16 and kernels._use_amx(libs[0], rows, k, n_out):
        return kernels.skinny_linear(x, weight, bias, libs[0])  # its AMX tiles
    out = torch.empty((rows, 1, n_out), dtype=x.dtype)
    if scale is not None:  # int8: float32 scales, a float32 or bfloat16 bias (the kernel widens it)
        entry(x.data_ptr(), rows, k, weight.data_ptr(), scale.data_ptr(), bias.data_ptr() if bias is not None else None,
              out.data_ptr(), n_out, threads, bits, quantize.bias_bf16(bias), int(quantize.is_tiled(weight)))
        return out
    entry(x.data_ptr(), rows, k, weight.data_ptr(), bias.data_ptr() if bias is not None else None, out.data_ptr(),
          n_out, threads)
    return out


@functools.lru_cache(maxsize=None)
def _libraries(int8: bool) -> tuple | None:
    """(float product, int8 product or None, norm, attention, the chain or None) kernels, or None
    if one of the first four cannot be built (without the chain the step calls them from Python)."""
    libs = (kernels.library(), quantize.library() if int8 else None, norms.library(), prefix_attention.kernel_library(),
            chain_library())
    return None if any(lib is None for i, lib in enumerate(libs[:4]) if i != 1 or int8) else libs


_CHAIN_SOURCE = Path(__file__).resolve().parent / "csrc" / "decode_step.cpp"


@functools.lru_cache(maxsize=None)
def chain_library(flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """`csrc/decode_step.cpp`: a layer's step as one or two C calls that call the kernels by
    pointer (`_Chain`), built at first use like the kernels; None if it cannot be built.
    `flags` select narrower instruction paths (the tests use them)."""
    return kernels.compiled(_CHAIN_SOURCE, "parscale_step", flags, _bind_chain, "CPU decode step",
                            "decode steps call the kernels one by one from Python")


def _bind_chain(lib: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.parscale_layer_front_f32, lib.parscale_layer_front_bf16):
        # layer, hidden, rows, cos, sin, cs_stride, kbuf, vbuf, buf_row_stride, buf_head_stride, column, mask,
        # mask_rows, h, gate_up, threads
        fn.argtypes = [pointer, pointer, size, pointer, pointer, size, pointer, pointer, size, size, size, pointer, size,
                       pointer, pointer, ctypes.c_int]
        fn.restype = None
    for fn in (lib.parscale_layer_back_f32, lib.parscale_layer_back_bf16):
        fn.argtypes = [pointer, pointer, size, pointer, pointer, ctypes.c_int]  # layer, m, rows, h, out, threads
        fn.restype = None
    # the front's arguments, then out and threads
    lib.parscale_layer_bf16.argtypes = [pointer, pointer, size, pointer, pointer, size, pointer, pointer, size, size,
                                        size, pointer, size, pointer, ctypes.c_int]
    lib.parscale_layer_bf16.restype = None
    lib.parscale_silu_mul_bf16.argtypes = [pointer, pointer, pointer, size, pointer, ctypes.c_int]  # gate, up, out, n, exp, threads
    lib.parscale_silu_mul_bf16.restype = None
    lib.parscale_has_silu.restype = ctypes.c_int
    # layers[n], n, hidden, rows, cos, sin, cs_stride, kbufs[n], vbufs[n], row_strides[n], head_strides[n], column,
    # mask, mask_rows, out, threads
    lib.parscale_stack_bf16.argtypes = [pointer, size, pointer, size, pointer, pointer, size, pointer, pointer, pointer,
                                        pointer, size, pointer, size, pointer, ctypes.c_int]
    lib.parscale_stack_bf16.restype = None
    return lib


@functools.lru_cache(maxsize=None)
def exp_for_silu(lib: ctypes.CDLL) -> int | None:
    """The address of torch's own vectorised exp of the width `lib` computes bfloat16 SiLU x up
    with (`Sleef_expf16_u10` with AVX-512, `Sleef_expf8_u10` with AVX2; torch's CPU library
    exports both, and its SiLU uses one), where `lib` then gives `F.silu(gate) * up` bit for bit
    for every one of the 65536 bfloat16 gate values on this machine (checked once here, about a
    millisecond); else None, and SiLU x up stays in torch between the step's two C calls."""
    width = lib.parscale_has_silu()
    if width not in (8, 16):
        return None
    try:
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        exp = _address(getattr(torch_cpu, f"Sleef_expf{width}_u10"))
    except (OSError, AttributeError):  # another platform's library name, or a torch built without Sleef
        return None
    gate = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # every bfloat16
    up = torch.randn(gate.shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        want = F.silu(gate) * up
    got = torch.empty_like(want)
    lib.parscale_silu_mul_bf16(gate.data_ptr(), up.data_ptr(), got.data_ptr(), gate.numel(), exp,
                               torch.get_num_threads())
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
    return exp if bool(same.all()) else None


class _CProduct(ctypes.Structure):
    """csrc/decode_step.cpp's ParscaleProduct: one group call's arguments but x, rows, y and threads."""
    _fields_ = [("fn", ctypes.c_void_p), ("int8", ctypes.c_int64), ("bits", ctypes.c_int64),
                ("bias_bf16", ctypes.c_int64), ("K", ctypes.c_int64), ("G", ctypes.c_int64),
                ("weights", ctypes.c_void_p * 4), ("scales", ctypes.c_void_p * 4), ("biases", ctypes.c_void_p * 4),
                ("N", ctypes.c_int64 * 4)]


class _CLayer(ctypes.Structure):
    """csrc/decode_step.cpp's ParscaleLayer: what a layer's step reads that no step changes."""
    _fields_ = [("norm", ctypes.c_void_p), ("rotary", ctypes.c_void_p), ("append", ctypes.c_void_p),
                ("attention", ctypes.c_void_p), ("norm_weight", ctypes.c_void_p * 2), ("eps", ctypes.c_float * 2),
                ("scaling", ctypes.c_float), ("unused", ctypes.c_float), ("qkv", _CProduct), ("o", _CProduct),
                ("gate_up", _CProduct), ("down", _CProduct), ("prefix_k", ctypes.c_void_p),
                ("prefix_v", ctypes.c_void_p), ("hidden", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("kv", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("n_prefix", ctypes.c_int64),
                ("n_streams", ctypes.c_int64), ("exp", ctypes.c_void_p)]


class _Chain(NamedTuple):
    """A layer's step as C calls (`_chained`): the struct they read and the entries."""
    layer: _CLayer  # kept alive here; `address` points into it
    address: int
    front: object
    back: object
    whole: object | None  # bfloat16 with `exp_for_silu`: the whole step in one call (front, SiLU x up, back)
    kv: int  # the keys' heads
    head_dim: int
    inter: int  # gate's (and up's) outputs


class _Layout(NamedTuple):
    """What a layer's decode step reads from its modules, found once (`_layout`)."""
    products: tuple  # q, k, v, o, gate, up, down: `_product_args`
    norms: tuple  # input, post-attention: `_norm_args`
    head_norms: tuple | None  # q and k per head (Qwen3): `_norm_args`, or None
    attention: nn.Module
    prefix: tuple  # (prefix_k, prefix_v); without prefixes, empty ones of one stream (plain_attention)
    head_dim: int
    index: int
    libs: tuple
    groups: tuple  # (q, k, v) and (gate, up) as `_Group`s, or None each (then one product at a time)
    chain: _Chain | None  # the step as one or two C calls, where the chain library and the layer allow


class _Group(NamedTuple):
    """Products of the same x in one C call (`kernels.group_entry`, `quantize.group_entry`), their
    pointers found once."""
    entry: object  # the C function
    weights: ctypes.Array  # G weight pointers
    scales: ctypes.Array | None  # int8: G scale pointers
    biases: ctypes.Array  # G bias pointers (None for none)
    bias_bf16: int  # int8: 1 where the biases are bfloat16 (the kernel widens them)
    sizes: ctypes.Array  # G output sizes
    splits: tuple  # the same sizes as ints
    k: int
    bits: int | None  # int8: the activations' bits


def _one_call(group: _Group | None, rows: int, dtype: torch.dtype, lib: ctypes.CDLL) -> _Group | None:
    """The group, unless the AMX tiles would take one of its float products (`_product`); then None."""
    if group is None or group.scales is not None or dtype != torch.bfloat16:
        return group
    return None if any(kernels._use_amx(lib, rows, group.k, n) for n in group.splits) else group


def _pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() if t is not None else None for t in tensors))


def _group(products: tuple, libs: tuple, dtype: torch.dtype) -> _Group | None:
    """The group of `products` (`_product_args` with their entries) where all are the float
    kernel's, or all int8 with the same activations' bits and biases of one dtype, with one
    input size; else None."""
    kinds = {(args[2] is None, args[4], args[1].dim()) for args in products}  # float or int8, bits, layout
    bias_dtypes = {args[3].dtype for args in products if args[3] is not None}
    if (len(kinds) != 1 or len({args[5][1] for args in products}) != 1 or len(products) > kernels.MAX_GROUP
            or len(bias_dtypes) > 1):
        return None
    weights, biases = [args[1] for args in products], [args[3] for args in products]
    sizes = tuple(args[5][0] for args in products)
    common = dict(weights=_pointers(weights), sizes=(ctypes.c_int64 * len(sizes))(*sizes), splits=sizes,
                  k=products[0][5][1])
    if products[0][2] is None:  # float
        return _Group(kernels.group_entry(libs[0], dtype), scales=None, biases=_pointers(biases), bias_bf16=0,
                      bits=None, **common)
    return _Group(quantize.group_entry(libs[1], dtype, quantize.is_tiled(weights[0])),
                  scales=_pointers([args[2] for args in products]), biases=_pointers(biases),
                  bias_bf16=int(bias_dtypes == {torch.bfloat16}), bits=products[0][4], **common)


def _grouped(group: _Group, x: torch.Tensor, libs, threads: int) -> list[torch.Tensor]:
    """The group's products of x [rows, 1, K] (contiguous): each [rows, 1, N] contiguous, equal bit
    for bit to `_product`'s, in one C call (one parallel loop: one fork and join for all)."""
    rows = x.shape[0]
    out = torch.empty(rows * sum(group.splits), dtype=x.dtype)
    if group.scales is None:
        group.entry(x.data_ptr(), rows, group.k, len(group.splits), group.weights, group.biases, out.data_ptr(),
                    group.sizes, threads)
    else:
        group.entry(x.data_ptr(), rows, group.k, len(group.splits), group.weights, group.scales, group.biases,
                    out.data_ptr(), group.sizes, threads, group.bits, group.bias_bf16)
    return [part.view(rows, 1, -1) for part in out.split([rows * n for n in group.splits])]


class _Plan(NamedTuple):
    """A layer's `_Layout` (or None: the layer's own forward) for one cache, dtype and mode. The
    checks read about a hundred module attributes, 40 us per layer and step on the decode
    benchmark's model (the layers' weights stream through the caches in between, so the Python
    objects are cold each time); within one `generate` the modules do not change, so the layout
    is found at its first decode step and reused while the cache is the same object, no hook was
    registered anywhere since (torch numbers every hook handle: `RemovableHandle.next_id`), and
    the dtype and train/eval mode are the same."""
    cache: weakref.ref
    hooks: int
    dtype: torch.dtype
    training: bool
    layout: _Layout | None


def _layout(layer: nn.Module, dtype: torch.dtype) -> _Layout | None:
    """The layer's modules and tensors for the decode step in `dtype`, or None where its own forward must run."""
    modules = layer._modules
    attention, mlp = modules["self_attn"], modules["mlp"]
    code = _attention_code(type(attention))
    if (layer.training or attention.training or _hooked(layer, attention, mlp) or code is None
            or not _recognised_mlp(type(mlp)) or _sliding(attention, code)):
        return None
    parts, mlp_parts = attention._modules, mlp._modules
    act = mlp_parts["act_fn"]
    if not isinstance(act, _SILU) or _hooked(act):
        return None
    products = tuple(_product_args(parts[name], dtype) for name in ("q_proj", "k_proj", "v_proj", "o_proj")) + tuple(
        _product_args(mlp_parts[name], dtype) for name in ("gate_proj", "up_proj", "down_proj"))
    norm_args = (_norm_args(modules["input_layernorm"], dtype), _norm_args(modules["post_attention_layernorm"], dtype))
    if None in products or None in norm_args:
        return None
    head_norms = None
    if code == "qwen3":
        head_norms = (_norm_args(parts["q_norm"], dtype), _norm_args(parts["k_norm"], dtype))
        if None in head_norms:
            return None
    kind = attention.config._attn_implementation
    prefix_k = getattr(attention, "prefix_k", None)
    if prefix_k is not None:
        prefix_v = attention.prefix_v
        if (kind not in _PREFIX_KINDS or prefix_k.dtype != dtype or prefix_v.dtype != dtype or not prefix_k.is_cpu
                or not prefix_v.is_cpu or not prefix_k.is_contiguous() or not prefix_v.is_contiguous()):
            return None
        prefix = (prefix_k, prefix_v)
    elif kind != _PLAIN_KIND or not getattr(attention, "parscale_fast_decode", False):
        return None
    else:
        prefix = None
    head_dim = attention.head_dim
    if head_dim % 2:
        return None
    if prefix is None:  # one stream without a prefix: empty ones (the keys' heads from k_proj's rows)
        empty = torch.empty(1, products[1][5][0] // head_dim, 0, head_dim, dtype=dtype)
        prefix = (empty, empty)
    libs = _libraries(any(args[0] is None for args in products))
    if libs is None:
        return None
    products = tuple((quantize.io_entry(libs[1], dtype) if args[0] is None else kernels.io_entry(libs[0], dtype), *args[1:])
                     for args in products)
    groups = (_group(products[:3], libs, dtype), _group(products[4:6], libs, dtype))
    chain = None
    if libs[4] is not None and head_norms is None and None not in groups:
        chain = _chain(products, groups, norm_args, attention.scaling, prefix, head_dim, libs, dtype)
    return _Layout(products, norm_args, head_norms, attention, prefix, head_dim, attention.layer_idx, libs, groups,
                   chain)


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _c_product(group: _Group) -> _CProduct:
    product = _CProduct(fn=_address(group.entry), int8=int(group.scales is not None), bits=group.bits or 0,
                        bias_bf16=group.bias_bf16, K=group.k, G=len(group.splits))
    for g, n in enumerate(group.splits):
        product.weights[g], product.biases[g], product.N[g] = group.weights[g], group.biases[g], n
        if group.scales is not None:
            product.scales[g] = group.scales[g]
    return product


def _chain(products: tuple, groups: tuple, norm_args: tuple, scaling: float, prefix: tuple, head_dim: int, libs: tuple,
           dtype: torch.dtype) -> _Chain | None:
    """The layer's `_Chain`: q/k/v and gate/up as their groups, o and down as groups of one
    (the group entries give what the single entries give, bit for bit); None where gate and up
    differ in size (SiLU x up)."""
    qkv, gate_up = groups
    if gate_up.splits[0] != gate_up.splits[1]:
        return None
    o, down = (_c_product(_group((products[i],), libs, dtype)) for i in (3, 6))
    bf16 = dtype == torch.bfloat16

    def entry(lib: ctypes.CDLL, name: str):  # the C function `name` of the layer's dtype
        return getattr(lib, f"parscale_{name}_{'bf16' if bf16 else 'f32'}")

    prefix_k, prefix_v = prefix
    layer = _CLayer(
        norm=_address(entry(libs[2], "rms_norm")), rotary=_address(entry(libs[3], "rotary")),
        append=_address(entry(libs[3], "rotary_append")), attention=_address(entry(libs[3], "decode_attention")),
        scaling=scaling, qkv=_c_product(qkv), o=o, gate_up=_c_product(gate_up), down=down,
        prefix_k=prefix_k.data_ptr(), prefix_v=prefix_v.data_ptr(), hidden=products[0][5][1],
        heads=qkv.splits[0] // head_dim, kv=qkv.splits[1] // head_dim, head_dim=head_dim, n_prefix=prefix_k.shape[2],
        n_streams=prefix_k.shape[0])
    for i, (weight, eps) in enumerate(norm_args):
        layer.norm_weight[i], layer.eps[i] = weight.data_ptr(), eps
    lib = libs[4]
    exp = exp_for_silu(lib) if bf16 else None
    whole = None
    if exp is not None:
        layer.exp, whole = exp, lib.parscale_layer_bf16
    return _Chain(layer, ctypes.addressof(layer), entry(lib, "layer_front"), entry(lib, "layer_back"), whole, layer.kv,
                  head_dim, gate_up.splits[0])


def _hooked(*modules: nn.Module) -> bool:
    """A forward hook or pre-hook on one of the modules (global hooks: `decode_step` checks them at every call)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def decode_step(layer: nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """One decode step of a recognised layer by the kernels, or None (then nothing was done) where
    the layer's own forward must run."""
    cache = kwargs.get(NEW_NAME, kwargs.get(OLD_NAME))
    embeddings = kwargs.get("position_embeddings")
    if (cache is None or embeddings is None or torch.is_grad_enabled() or hidden_states.dim() != 3
            or hidden_states.shape[1] != 1 or not kernels.cpu_inference(hidden_states)
            or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks):
        return None
    dtype, rows = hidden_states.dtype, hidden_states.shape[0]
    if dtype not in (torch.float32, torch.bfloat16) or rows > kernels.MAX_ROWS or hidden_states.numel() > norms.MAX_VALUES:
        return None
    plan = layer.__dict__.get("_parscale_plan")
    if (plan is None or plan.cache() is not cache or plan.hooks != RemovableHandle.next_id or plan.dtype != dtype
            or plan.training != layer.training):
        plan = _Plan(weakref.ref(cache), RemovableHandle.next_id, dtype, layer.training, _layout(layer, dtype))
        layer.__dict__["_parscale_plan"] = plan
    layout = plan.layout
    if layout is None:
        return None
    if layout.head_norms is not None and rows * layout.products[0][5][0] > norms.MAX_VALUES:
        return None  # the q norm's own forward would take torch's path for that many values
    layers = getattr(cache, "layers", None)
    if layers is None or layout.index >= len(layers) or type(layers[layout.index]) not in _CACHE_LAYERS:
        return None
    # a cache of in-place layers whose `update` is the stock one (no subclass of the cache adds
    # to it, no offloading): the step may append the keys and values itself
    append = (type(layers[layout.index]) is GrowingLayer and type(cache).update is _CACHE_UPDATE
              and not getattr(cache, "offloading", False))
    if not prefix_attention.rotary_fits(*embeddings, dtype, layout.head_dim, rows):
        return None
    return _step(layer, layout, hidden_states, kwargs.get("attention_mask"), embeddings, cache, append)


def _step(layer: nn.Module, layout: _Layout, hidden_states, mask, embeddings, cache, append: bool) -> torch.Tensor:
    """The stock layer's arithmetic in its order (see the module docstring); the checks are done."""
    cos, sin = embeddings
    q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj = layout.products
    libs, head_dim, rows = layout.libs, layout.head_dim, hidden_states.shape[0]
    threads = torch.get_num_threads()
    hidden_states = hidden_states if hidden_states.is_contiguous() else hidden_states.contiguous()
    amx = rows >= kernels.AMX_MIN_ROWS and getattr(libs[0], "amx", False)  # the tiles may take float products
    layer_cache, chain = cache.layers[layout.index], layout.chain
    if chain is not None and use_chain and append and not amx and prefix_attention.use_kernel:
        column = layer_cache.free_column(rows, chain.kv, head_dim, hidden_states.dtype)
        if column is not None:
            out = _chained(chain, hidden_states, mask, cos, sin, layer_cache, column, threads)
            if chain.whole is not None and use_stack:  # the steps of a forward's layers as one call, from the next
                decode_stack.record(layer, hidden_states, out, cache, mask, embeddings, column)
            return out
    x = norms.rms_norm(hidden_states, *layout.norms[0], libs[2])
    qkv, gate_up = layout.groups
    if amx:
        qkv, gate_up = (_one_call(group, rows, hidden_states.dtype, libs[0]) for group in layout.groups)
    if qkv is not None:
        query, key, value = _grouped(qkv, x, libs, threads)
    else:
        query = _product(q_proj, x, libs, threads)  # rows 1 heads*d
        key, value = _product(k_proj, x, libs, threads), _product(v_proj, x, libs, threads)  # rows 1 kv*d
    heads, kv = query.shape[-1] // head_dim, key.shape[-1] // head_dim
    if layout.head_norms is not None:  # Qwen3: each head of q and k normalised, then rotated
        query = norms.rms_norm(query.view(rows, heads, head_dim), *layout.head_norms[0], libs[2]).view(rows, 1, -1)
        key = norms.rms_norm(key.view(rows, kv, head_dim), *layout.head_norms[1], libs[2]).view(rows, 1, -1)
    rotary_in_place(query, heads, cos, sin, libs[3])
    column = layer_cache.free_column(rows, kv, head_dim, hidden_states.dtype) if append else None
    if column is not None:  # rotated straight into the cache's buffers: what the two lines below do
        rotary_append(key, value, kv, cos, sin, layer_cache._buffers, column, libs[3])
        keys, values = layer_cache.filled(column + 1)
    else:
        rotary_in_place(key, kv, cos, sin, libs[3])
        keys, values = cache.update(key.view(rows, 1, kv, head_dim).transpose(1, 2),
                                    value.view(rows, 1, kv, head_dim).transpose(1, 2), layout.index)
    query = query.view(rows, heads, 1, head_dim)
    prefix_k, prefix_v = layout.prefix
    attention = layout.attention
    if column is not None and prefix_attention.use_kernel:  # the kernel's checks hold: the buffers' views
        out = prefix_attention.call_kernel(query, keys, values, prefix_attention.additive_mask(mask), prefix_k,
                                           prefix_v, attention.scaling, libs[3])
    else:
        out = prefix_attention._decode_attention_kernel(query, keys, values, mask, prefix_k, prefix_v,
                                                        attention.scaling)
    if out is None:  # a layout the kernel does not take: the attention kind's own function (the cache is updated)
        function = ALL_ATTENTION_FUNCTIONS[attention.config._attn_implementation]
        out, _ = function(attention, query, keys, values, mask, dropout=0.0, scaling=attention.scaling)
    hidden_states = hidden_states + _product(o_proj, out.reshape(rows, 1, heads * head_dim), libs, threads)
    x = norms.rms_norm(hidden_states, *layout.norms[1], libs[2])
    if gate_up is not None:
        gate, up = _grouped(gate_up, x, libs, threads)
        up = F.silu(gate) * up
    else:
        up = _product(gate_proj, x, libs, threads)
        up = F.silu(up) * _product(up_proj, x, libs, threads)
    return hidden_states + _product(down_proj, up, libs, threads)


def _chained(chain: _Chain, hidden_states, mask, cos, sin, layer_cache: GrowingLayer, column: int,
             threads: int) -> torch.Tensor:
    """`_step`'s arithmetic as one C call in bfloat16 (`_Chain.whole`), else as two C calls and
    SiLU x up between them (csrc/decode_step.cpp): the same kernels with the same arguments in
    the same order, so the same bits; the keys and values go into `column` of the cache layer's
    buffers."""
    rows, dtype = hidden_states.shape[0], hidden_states.dtype
    keys, values = layer_cache._buffers
    additive = prefix_attention.additive_mask(mask)
    # the arguments the one call and the front share (csrc/decode_step.cpp)
    args = (chain.address, hidden_states.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(),
            chain.head_dim if cos.shape[0] > 1 else 0, keys.data_ptr(), values.data_ptr(), keys.stride(0),
            keys.stride(1), column, *((additive.data_ptr(), additive.shape[0]) if additive is not None else (None, 0)))
    if chain.whole is not None:
        out = torch.empty(hidden_states.shape, dtype=dtype)
        chain.whole(*args, out.data_ptr(), threads)
        layer_cache.filled(column + 1)
        return out
    h = torch.empty(hidden_states.shape, dtype=dtype)
    n = rows * chain.inter
    gate_up = torch.empty(2 * n, dtype=dtype)
    chain.front(*args, h.data_ptr(), gate_up.data_ptr(), threads)
    layer_cache.filled(column + 1)
    up = F.silu(gate_up[:n].view(rows, 1, -1)) * gate_up[n:].view(rows, 1, -1)
    out = torch.empty(hidden_states.shape, dtype=dtype)
    chain.back(chain.address, up.data_ptr(), rows, h.data_ptr(), out.data_ptr(), threads)
    return out


# ----- the class swap ---------------------------------------------------------------------------
def _forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if self.use_kernel and not args:
        out = decode_step(self, hidden_states, kwargs)
        if out is not None:
            return out
    return self._stock_forward(hidden_states, *args, **kwargs)


def _call(self, *args, **kwargs):
    """`layer(hidden_states, ...)`: the decode step without `nn.Module.__call__` and transformers'
    checkpointing wrapper around `forward` (15 us per layer and step on the benchmark's model).
    What those would do is checked here or in `decode_step`: no hook on the layer (its plan is
    found again after any hook is registered), no global hook, no autograd (so no checkpointing),
    not compiling, and a module compiled with `layer.compile()` takes its compiled call."""
    if len(args) == 1 and self.use_kernel and self._compiled_call_impl is None:
        link = self.__dict__.get("_parscale_link")  # a stack's (`decode_stack`)
        if link is not None and use_stack and use_chain:
            out = decode_stack.step(link, args[0], kwargs)
            if out is not None:
                return out
        out = decode_step(self, args[0], kwargs)
        if out is not None:
            return out
    return self._stock_class.__call__(self, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def fast_class(cls: type) -> type:
    """`cls` with the decode step's forward (`norms.subclass`: pickle finds it in this module)."""
    return norms.subclass(cls, _forward, __name__, _FAST, __call__=_call)


def __getattr__(name: str) -> type:
    """Pickle's lookup of a fast class (PEP 562): rebuilt from the stock class its name encodes."""
    if not name.startswith(_FAST):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return fast_class(norms.stock_class(name, _FAST))


def forget(model: nn.Module) -> None:
    """Drop the layers' cached layouts (`_Plan`): after modules were replaced (`quantize_int8`),
    so that no layout holds the replaced weights or is reused with a cache it was found for."""
    for module in model.modules():
        module.__dict__.pop("_parscale_plan", None)
        decode_stack.forget(module)


def enable(model: nn.Module, enabled: bool = True) -> int:
    """Give the recognised decoder layers of `model` the decode step (or their own forward back
    with `enabled=False`); returns how many."""
    forget(model)
    return norms.swap_classes(model, is_llama_decoder_layer, fast_class, enabled)
