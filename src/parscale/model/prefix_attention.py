"""Attention over `[the row's stream prefix ; the real keys]`, registered with transformers.

Each attention module of a model with prefixes owns `prefix_k`/`prefix_v`, `[P, kv, T, d]`
(see `streams`). Instead of forking every modeling file, one attention function per kind is
registered in transformers' `AttentionInterface`: it receives keys/values that are already
rotary-embedded and joined with the cache, puts the (never rotated) prefix of each row's
stream in front, and attends. Three kinds, chosen by the backbone's `attn_implementation`:
`parscale_sdpa` (the default), `parscale_eager` (explicit softmax, returns the weights) and
`parscale_fa2` (the `flash-attn` package, where installed).

Which path a call takes depends on the mask our mask function made (`prefix_mask`):
- `None`: no padding and the queries start at position 0 (training, plain prefill). The
  prefix plus causal attention is causal attention aligned to the bottom right of a key
  sequence T longer than the queries. On a GPU we hand sdpa T zero queries in front of the
  real ones, which makes it square, so its `is_causal` (flash or memory-efficient kernel, GQA
  without repeating the keys) gives exactly that; the T extra rows are dropped. No mask is
  built. On the CPU one `[L, T+L]` mask shared by all rows is cheaper than the extra rows.
- a `PackedMask`, made a FlexAttention `BlockMask` (CUDA, no padding, position ids that restart: packed rows):
  the document structure with the prefix columns always visible, no L x L tensor.
- a 4D bool mask (padded rows, a cache, sliding windows): widened by T visible columns.
- one query per row (a decode step): `decode_attention` scores the prefix and the cache
  separately, in the cache's own dtype, and merges them, so neither is joined or repeated.

A P = 1 model without prefixes registers `parscale_plain_sdpa` (`plain_attention`): the stock
sdpa and the stock mask, except that a CPU decode step takes the C++ decode kernel with an empty
prefix while the model's fast kernels are on (`use_fast_kernels`).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from parscale.errors import UserError
from parscale.model import kernels

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "parscale_sdpa"  # contains "sdpa" so transformers' sdpa dispatch checks pass
# the backbone's attn_implementation -> ours
IMPLEMENTATIONS = {"sdpa": ATTN_IMPLEMENTATION, "eager": "parscale_eager", "flash_attention_2": "parscale_fa2"}
# ... and, for a P = 1 model without prefixes, the stock kind -> ours where we have one (else the stock kind)
PLAIN_IMPLEMENTATIONS = {"sdpa": "parscale_plain_sdpa"}

try:  # FlexAttention (torch >= 2.5): packed rows on CUDA
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    create_block_mask = flex_attention = None


def expand_prefix(prefix: torch.Tensor, batch: int) -> torch.Tensor:
    """`[P, kv, T, d] -> [(P b), kv, T, d]`, stream-major like the replicated batch (row n*B + b)."""
    return prefix.repeat_interleave(batch, dim=0)


def widen_mask(mask: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Prepend `n_prefix` always-visible key columns to a 4D sdpa (bool) or eager (additive) mask."""
    rows = mask.shape[0]
    if mask.dtype == torch.bool:
        visible = torch.ones(rows, 1, mask.shape[2], n_prefix, dtype=torch.bool, device=mask.device)
    else:  # additive float mask: 0 = visible
        visible = torch.zeros(rows, 1, mask.shape[2], n_prefix, dtype=mask.dtype, device=mask.device)
    return torch.cat([visible, mask.expand(rows, 1, mask.shape[2], -1)], dim=-1)  # rows 1 q (T+kv)


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """`[1, 1, q, kv]` bool: query i sees the real keys up to kv_len - q_len + i (bottom right)."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)[None, None]


def _join_prefix(module: nn.Module, key: torch.Tensor, value: torch.Tensor, batch: int):
    """`rows kv L d -> rows kv (T+L) d`: each row's stream prefix in front of its keys and values."""
    key = torch.cat([expand_prefix(module.prefix_k, batch).to(key.dtype), key], dim=2)
    value = torch.cat([expand_prefix(module.prefix_v, batch).to(value.dtype), value], dim=2)
    return key, value


def _prepare(module, query, key, value, attention_mask, kwargs):
    """(batch, key, value, dropout, scaling) common to every kind; checks the rows."""
    n_streams = module.prefix_k.shape[0]
    rows, q_len = key.shape[0], query.shape[2]
    if rows % n_streams:
        raise ValueError(f"attention got {rows} rows, not a multiple of the {n_streams} streams")
    if attention_mask is None and q_len > 1:
        # `prefix_mask` returns None only for queries that start at position 0: the real keys are
        # the first q_len (a static cache holds empty slots after them)
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    return rows // n_streams, key, value, dropout, scaling


def parscale_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """`parscale_sdpa`: query `[rows, heads, q, d]`, key/value `[rows, kv, L, d]` -> `[rows, q, heads, d]`."""
    if getattr(module, "prefix_k", None) is None:  # a layer without prefixes (P = 1) is plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    batch, key, value, dropout, scaling = _prepare(module, query, key, value, attention_mask, kwargs)
    if query.shape[2] == 1 and not dropout:
        return decode_attention(query, key, value, attention_mask, module.prefix_k, module.prefix_v, scaling), None
    key, value = _join_prefix(module, key, value, batch)
    if attention_mask is None:
        return causal_prefix_sdpa(query, key, value, scaling, dropout), None
    if isinstance(attention_mask, PackedMask):
        out = _flex()(query, key, value, block_mask=attention_mask.block_mask(module.prefix_k.shape[2]),
                      scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    mask = widen_mask(attention_mask.to(query.device), module.prefix_k.shape[2])
    kwargs["is_causal"] = False  # causality is in the mask; the prefix makes kv longer than q
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def plain_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """`parscale_plain_sdpa`, a layer without prefixes: transformers' sdpa, except one query per
    row on the CPU with the fast kernels on (`module.parscale_fast_decode`, set by the wrapper),
    which `decode_attention` takes with an empty prefix. torch's fused CPU attention spends
    about 140 us per layer and step setting up for a single bfloat16 query (2.2 of a 28 ms step
    at P = 1 on the benchmark's 16 layers); the kernel takes about 20."""
    if (query.shape[2] == 1 and getattr(module, "parscale_fast_decode", False) and not module.training
            and kwargs.get("softcap") is None and kwargs.get("s_aux") is None and kernels.cpu_inference(query, key, value)):
        empty = key.new_empty(1, key.shape[1], 0, query.shape[-1])  # one stream, no prefix
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        out = _decode_attention_kernel(query, key, value, attention_mask, empty, empty, scaling)
        if out is not None:  # else a dtype or layout it does not take, or no compiler: the stock sdpa
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def causal_prefix_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                       dropout: float = 0.0, shared_mask: bool | None = None) -> torch.Tensor:
    """Query i of L sees keys 0..T+i of the T+L (the prefix, then real keys 0..i), without a
    per-row mask.

    On a GPU, T zero queries go in front: sdpa's square `is_causal` (top left = bottom right)
    gives each real query exactly those keys, so its flash or memory-efficient kernel runs and
    GQA needs no copy of the keys; the T padding rows cost T/L of the attention and are dropped.
    (`torch.nn.attention.bias.causal_lower_right` does the same but breaks `torch.compile`'s
    graph.) On the CPU (`shared_mask`, the default there) one `[L, T+L]` mask shared by every
    row is cheaper: its fused kernel takes a mask, and forward plus backward at L = 128, T = 48
    measured 30% faster than with the T extra rows (equal at L = 512).
    query `[rows, h, L, d]`, key/value `[rows, kv, T+L, d]` -> `[rows, L, h, d]`."""
    rows, heads, q_len, dim = query.shape
    n_prefix = key.shape[2] - q_len
    if query.device.type == "cpu" if shared_mask is None else shared_mask:
        visible = torch.ones(q_len, key.shape[2], dtype=torch.bool, device=query.device).tril(n_prefix)  # L (T+L)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=visible, dropout_p=dropout,
                                             scale=scaling, enable_gqa=heads != key.shape[1])
        return out.transpose(1, 2).contiguous()  # rows L h d
    padded = torch.cat([query.new_zeros(rows, heads, n_prefix, dim), query], dim=2)  # rows h (T+L) d
    out = F.scaled_dot_product_attention(padded, key, value, dropout_p=dropout, is_causal=True, scale=scaling,
                                         enable_gqa=heads != key.shape[1])
    return out[:, :, n_prefix:].transpose(1, 2).contiguous()  # rows L h d


_compiled_flex = None


def _flex():
    """FlexAttention compiled once (uncompiled it builds the whole score matrix); eager off CUDA."""
    global _compiled_flex
    if not torch.cuda.is_available():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`parscale_eager`: scores, float32 softmax and weights over `[prefix ; keys]`, every step
    (what users of `attn_implementation="eager"` want: the attention weights, no fused kernel)."""
    if getattr(module, "prefix_k", None) is None:
        mask = attention_mask if attention_mask is not None else causal_mask(query.shape[2], key.shape[2], query.device)
        return _eager(query, key, value, mask, kwargs.get("scaling") or query.shape[-1] ** -0.5,
                      kwargs.get("dropout", 0.0) if module.training else 0.0)
    batch, key, value, dropout, scaling = _prepare(module, query, key, value, attention_mask, kwargs)
    mask = attention_mask if attention_mask is not None else causal_mask(query.shape[2], key.shape[2], query.device)
    key, value = _join_prefix(module, key, value, batch)
    return _eager(query, key, value, widen_mask(mask.to(query.device), module.prefix_k.shape[2]), scaling, dropout)


def _eager(query, key, value, mask, scaling, dropout):
    rows, heads, q_len, dim = query.shape
    groups = heads // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)  # rows h S d
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # rows h q S
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs  # rows q h d


def flash_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """`parscale_fa2`: the `flash-attn` package for unpadded rows (its causal mask is aligned to the
    bottom right when kv is longer than q); padded rows, packed rows and decode steps as sdpa."""
    if getattr(module, "prefix_k", None) is None or attention_mask is not None or query.shape[2] == 1:
        return parscale_attention(module, query, key, value, attention_mask, **kwargs)
    from flash_attn import flash_attn_func

    batch, key, value, dropout, scaling = _prepare(module, query, key, value, attention_mask, kwargs)
    key, value = _join_prefix(module, key, value, batch)
    out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),  # rows L h d
                          dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out, None


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     prefix_k: torch.Tensor, prefix_v: torch.Tensor, scaling: float) -> torch.Tensor:
    """One query per row over `[its stream's prefix ; the cache]`, without joining or repeating them.

    query `[rows, heads, 1, d]`, key/value `[rows, kv, L, d]`, prefixes `[P, kv, T, d]`, the mask
    `[rows or 1, 1, 1, L]` (bool: True = visible; or additive float) or None. Returns
    `[rows, 1, heads, d]` like the stock attention functions.

    On CPU, two calls of torch's fused flash-attention kernel, each in the input dtype with
    float32 accumulation, each returning its log-sum-exp: the cache part with every row's query
    heads of one KV head as that head's queries (`[rows, kv, groups, d]`; they share one
    position, so they need no causality among them), the prefix part with every row of one
    stream as that stream's queries (`[P, kv, batch*groups, d]` against `[P, kv, T, d]`, the
    prefix never repeated per row). The two partial results are then merged in float32 by their
    log-sum-exps, which is the softmax over the joined keys. Elsewhere (CUDA, autograd, graph
    capture), `_decode_attention_matmul`.
    """
    if not kernels.cpu_inference(query, key, value, prefix_k, prefix_v):
        return _decode_attention_matmul(query, key, value, mask, prefix_k, prefix_v, scaling)
    out = _decode_attention_kernel(query, key, value, mask, prefix_k, prefix_v, scaling)
    if out is not None:
        return out
    if _flash_cpu is None:
        return _decode_attention_matmul(query, key, value, mask, prefix_k, prefix_v, scaling)
    rows, heads, _, dim = query.shape
    n_streams, kv, n_prefix, _ = prefix_k.shape
    groups, batch = heads // kv, rows // n_streams
    dtype = query.dtype
    q = query.reshape(rows, kv, groups, dim)  # rows kv g d (heads are kv-major); a view
    if mask is not None:
        mask = mask[..., -1:, :].reshape(mask.shape[0], 1, 1, -1).to(query.device)  # rows|1 1 1 L
        lowest = torch.finfo(dtype).min  # not -inf: a fully hidden cache then weighs 0 in the merge
        if mask.dtype == torch.bool:  # the kernel takes additive masks only
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, lowest)
        else:
            mask = mask.to(dtype).clamp(min=lowest)
    out, lse = _flash_cpu(q, key, value, attn_mask=mask, scale=scaling)  # rows kv g d, rows kv g
    q_streams = q.reshape(n_streams, batch, kv, groups, dim).transpose(1, 2).reshape(n_streams, kv, batch * groups, dim)
    prefix_out, prefix_lse = _flash_cpu(q_streams, prefix_k.to(dtype), prefix_v.to(dtype), scale=scaling)
    prefix_out = prefix_out.reshape(n_streams, kv, batch, groups, dim).transpose(1, 2).reshape(rows, kv, groups, dim)
    prefix_lse = prefix_lse.reshape(n_streams, kv, batch, groups).transpose(1, 2).reshape(rows, kv, groups)
    # softmax over both parts: the cache's share is e^lse / (e^lse + e^prefix_lse)
    share = torch.sigmoid(lse - prefix_lse).unsqueeze(-1)  # rows kv g 1, float32 (float64 for float64)
    merged = torch.lerp(prefix_out.to(share.dtype), out.to(share.dtype), share)  # rows kv g d
    return merged.reshape(rows, 1, heads, dim).to(dtype)  # rows 1 heads d


_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_KERNEL_SOURCE = Path(__file__).resolve().parent / "csrc" / "decode_attention.cpp"


@functools.lru_cache(maxsize=None)
def kernel_library(flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """`csrc/decode_attention.cpp`, built at first use like the decode matmul (`kernels.compiled`)."""
    return kernels.compiled(_KERNEL_SOURCE, "parscale_attention", flags, _bind, "CPU decode attention kernel",
                            "decode steps use torch's fused attention")


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.parscale_decode_attention_f32, lib.parscale_decode_attention_bf16):
        fn.argtypes = ([pointer] * 3 + [size] * 3 + [pointer] * 3 + [size, pointer] + [size] * 7
                       + [ctypes.c_float, ctypes.c_int])
        fn.restype = None
    for fn in (lib.parscale_rotary_f32, lib.parscale_rotary_bf16):
        fn.argtypes = [pointer] + [size] * 4 + [pointer] * 2 + [size]
        fn.restype = None
    for fn in (lib.parscale_rotary_append_f32, lib.parscale_rotary_append_bf16):
        fn.argtypes = [pointer] * 2 + [size] * 3 + [pointer] * 2 + [size] + [pointer] * 2 + [size] * 3
        fn.restype = None
    return lib


use_kernel = True  # the tests switch it off to compare with torch's fused attention


def _decode_attention_kernel(query, key, value, mask, prefix_k, prefix_v, scaling) -> torch.Tensor | None:
    """`decode_attention` in one C++ call (`csrc/decode_attention.cpp`), or None where it does not
    apply (another dtype, a layout it does not take, no compiler)."""
    dtype = query.dtype
    if not use_kernel or dtype not in (torch.float32, torch.bfloat16) or not (
            key.dtype == value.dtype == prefix_k.dtype == prefix_v.dtype == dtype):
        return None
    if key.stride() != value.stride() or key.stride(-1) != 1 or not (prefix_k.is_contiguous() and prefix_v.is_contiguous()):
        return None
    lib = kernel_library()
    if lib is None:
        return None
    q = query if query.is_contiguous() else query.contiguous()  # rows heads 1 d: rows heads d in memory
    return call_kernel(q, key, value, additive_mask(mask), prefix_k, prefix_v, scaling, lib)


def rotary_fits(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype, head_dim: int, rows: int) -> bool:
    """The rotary embedding's cos and sin as the decode step's rotary kernels read them
    (`csrc/decode_attention.cpp`): [rows or 1, 1, head_dim] each, of x's dtype, contiguous, on
    the CPU. One check for the layer's step (`decode_layer`) and the stack's (`decode_stack`)."""
    return (cos.dtype == dtype and sin.dtype == dtype and cos.shape == sin.shape and cos.dim() == 3
            and cos.shape[1] == 1 and cos.shape[-1] == head_dim and cos.shape[0] in (1, rows)
            and cos.is_contiguous() and sin.is_contiguous() and cos.is_cpu and sin.is_cpu)


def additive_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The last query's row of the attention mask as the kernel reads it: float32 [rows or 1, L],
    0 or -inf (a bool mask) or the mask's own values (an additive one)."""
    if mask is None:
        return None
    mask = mask[..., -1:, :].reshape(mask.shape[0], -1)  # rows|1 L
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
    return mask.float().contiguous()


def call_kernel(query, key, value, additive, prefix_k, prefix_v, scaling, lib) -> torch.Tensor:
    """The kernel's C call, its checks done (`_decode_attention_kernel`): query [rows, heads, 1, d]
    contiguous, key and value [rows, kv, L, d] of equal strides (d contiguous), the prefixes
    [P, kv, T, d] contiguous, all of one dtype; `additive` from `additive_mask`. The decode step
    (`decode_layer`) calls it directly where its plan has checked the same."""
    rows, heads, _, dim = query.shape
    n_streams, kv, n_prefix, _ = prefix_k.shape
    out = torch.empty(rows, 1, heads, dim, dtype=query.dtype)  # rows 1 heads d: rows heads d in memory
    fn = lib.parscale_decode_attention_f32 if query.dtype == torch.float32 else lib.parscale_decode_attention_bf16
    fn(query.data_ptr(), key.data_ptr(), value.data_ptr(), key.stride(0), key.stride(1), key.stride(2),
       prefix_k.data_ptr(), prefix_v.data_ptr(), additive.data_ptr() if additive is not None else None,
       additive.shape[0] if additive is not None else 0, out.data_ptr(), rows, heads, kv, key.shape[2], n_prefix, dim,
       rows // n_streams, scaling, torch.get_num_threads())
    return out


def _decode_attention_matmul(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                             prefix_k: torch.Tensor, prefix_v: torch.Tensor, scaling: float) -> torch.Tensor:
    """`decode_attention` by matmuls in the cache's own dtype (the cache is read once, never
    copied or converted; scores as the stock eager attention computes them), one float32
    softmax over both parts. Grouped-query layout: each KV head's query heads are its queries."""
    rows, heads, _, dim = query.shape
    n_streams, kv, n_prefix, _ = prefix_k.shape
    groups, batch = heads // kv, rows // n_streams
    dtype = key.dtype
    q = query.reshape(rows, kv, groups, dim).to(dtype)  # rows kv g d (heads are kv-major)
    cache_scores = torch.matmul(q, key.transpose(-1, -2)).float() * scaling  # rows kv g L
    if mask is not None:
        mask = mask[..., -1:, :].reshape(mask.shape[0], 1, 1, -1).to(cache_scores.device)  # rows|1 1 1 L
        if mask.dtype == torch.bool:
            cache_scores = cache_scores.masked_fill(~mask, float("-inf"))
        else:
            cache_scores = cache_scores + mask.float()
    q_streams = q.reshape(n_streams, batch, kv, groups, dim)  # P b kv g d (rows are stream-major)
    prefix_scores = torch.einsum("pbkgd,pktd->pbkgt", q_streams, prefix_k.to(dtype)).float() * scaling
    scores = torch.cat([prefix_scores.reshape(rows, kv, groups, n_prefix), cache_scores], dim=-1)  # rows kv g (T+L)
    probs = torch.softmax(scores, dim=-1).to(dtype)
    out = torch.matmul(probs[..., n_prefix:], value)  # rows kv g d
    prefix_probs = probs[..., :n_prefix].reshape(n_streams, batch, kv, groups, n_prefix)
    out = out + torch.einsum("pbkgt,pktd->pbkgd", prefix_probs, prefix_v.to(dtype)).reshape(rows, kv, groups, dim)
    return out.reshape(rows, 1, heads, dim).to(query.dtype)  # rows 1 heads d


# ----- the mask --------------------------------------------------------------------------------
def prefix_mask(*args, **kwargs):
    """The mask `parscale_sdpa` receives: None, a `PackedMask`, or the stock 4D bool mask.

    None when sdpa's causal shortcut applies (no padding; the stock sdpa mask's own test), which
    then also means that the queries start at position 0 (see `_prepare`). A `PackedMask` on
    CUDA for unpadded square blocks that need more than causality (position ids that restart:
    packed rows). Otherwise the materialised bool mask, widened by the attention function."""
    if PackedMask.applies(kwargs):
        return PackedMask(kwargs)
    return plain_prefix_mask(*args, **kwargs)


def plain_prefix_mask(*args, **kwargs):
    """The mask of `parscale_eager` and `parscale_fa2`: None or the stock 4D bool mask."""
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(*args, **kwargs)


class PackedMask:
    """transformers' mask function for one forward, made into a FlexAttention `BlockMask` with T
    always-visible prefix columns by the first layer that needs it (the mask function does not
    know T), then shared by every layer: the document structure without an L x L tensor."""

    def __init__(self, kwargs: dict) -> None:
        self.kwargs, self._made = kwargs, {}

    @staticmethod
    def applies(kwargs: dict) -> bool:
        """CUDA only (uncompiled FlexAttention is slower than a mask); unpadded, uncached, square."""
        if create_block_mask is None or torch.device(kwargs.get("device", "cpu")).type != "cuda":
            return False
        q_offset, attention_mask = kwargs.get("q_offset", 0), kwargs.get("attention_mask")
        square = isinstance(q_offset, int) and q_offset == 0 and kwargs.get("kv_length") == kwargs.get("q_length") > 1
        skippable = kwargs.get("allow_is_causal_skip", True)  # transformers turns it off for packed rows
        return square and not skippable and (attention_mask is None or bool(attention_mask.all()))

    def block_mask(self, n_prefix: int):
        if n_prefix not in self._made:
            k = self.kwargs
            inner, q_len, device = k["mask_function"], k["q_length"], k.get("device", "cpu")

            def with_prefix(b, h, q, kv):
                return (kv < n_prefix) | inner(b, h, q, (kv - n_prefix).clamp(min=0))

            self._made[n_prefix] = create_block_mask(with_prefix, B=k["batch_size"], H=None, Q_LEN=q_len,
                                                     KV_LEN=n_prefix + q_len, device=device,
                                                     _compile=torch.device(device).type == "cuda")
        return self._made[n_prefix]


def plain_kind(name: str | None) -> str:
    """The stock attention a name stands for: ours map back to the kind they wrap."""
    ours = {o: stock for table in (IMPLEMENTATIONS, PLAIN_IMPLEMENTATIONS) for stock, o in table.items()}
    return ours.get(name or "sdpa", name or "sdpa")


def register_plain(kind: str) -> str:
    """The attention name for a P = 1 model without prefixes whose stock kind is `kind`:
    `parscale_plain_sdpa` (registered here, with the stock sdpa mask) for sdpa, else `kind`."""
    name = PLAIN_IMPLEMENTATIONS.get(kind)
    return kind if name is None else _register(name)


def implementation_for(requested: str | None) -> str:
    """Our attention name for the backbone's `attn_implementation` (a `UserError` for the rest)."""
    requested = plain_kind(requested)  # ours (a ParScale model's backbone wrapped again) stand for the stock kinds
    if requested not in IMPLEMENTATIONS:
        raise UserError(f"attn_implementation={requested!r} cannot carry the stream prefixes; "
                        f"use one of {sorted(IMPLEMENTATIONS)} (default sdpa)")
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UserError("attn_implementation='flash_attention_2' needs the flash-attn package "
                        "(pip install flash-attn); the default 'sdpa' already runs PyTorch's flash kernel "
                        "for unpadded rows")
    return IMPLEMENTATIONS[requested]


_FUNCTIONS = {"parscale_sdpa": parscale_attention, "parscale_eager": eager_attention, "parscale_fa2": flash_attention}


def register_attention(requested: str | None = "sdpa") -> str:
    """Register our attention and mask function for `requested` (idempotent) and return the name."""
    return _register(implementation_for(requested))


def _register(name: str) -> str:
    """One of our names, with its attention and mask function, in transformers' registries."""
    if name in _FUNCTIONS:
        AttentionInterface.register(name, _FUNCTIONS[name])
        AttentionMaskInterface.register(name, prefix_mask if name == ATTN_IMPLEMENTATION else plain_prefix_mask)
    else:  # a P = 1 name (PLAIN_IMPLEMENTATIONS)
        AttentionInterface.register(name, plain_attention)
        AttentionMaskInterface.register(name, sdpa_mask)
    return name


def is_prefix_attention(name: str | None) -> bool:
    return name in _FUNCTIONS


# Every name is registered once on import as well: a whole model unpickled in a new process
# (`torch.load(path, weights_only=False)` of a `torch.save(model)`) names its attention before
# anything has wrapped a model there.
for _name in (*_FUNCTIONS, *PLAIN_IMPLEMENTATIONS.values()):
    _register(_name)
