"""The prefix bank and the attention hook that prepends it.

Each attention module of a P > 1 model owns `prefix_k` and `prefix_v`, both
`[P, n_kv_heads, n_prefix_tokens, head_dim]` (the released checkpoints' names and shapes).
Instead of forking every modeling file, we register one attention function in transformers'
`AttentionInterface`: it receives keys/values that are already rotary-embedded and joined
with the cache, prepends the (never rotated) prefix of each row's stream, widens the mask
by the prefix columns, and hands over to the stock sdpa function, which handles GQA.

A decode step (one query per row) takes `decode_attention` instead: the stock path would copy
the whole cache twice per layer and step (the prefix concatenation, then sdpa's `repeat_kv`,
which transformers applies whenever a mask is given on CPU). On CPU it attends to the cache and
to the prefix separately with torch's fused flash-attention kernel, in the cache's own dtype
with float32 accumulation: each KV head's query heads are that head's queries (grouped-query
layout, the cache neither repeated nor converted), and for the prefix every row of a stream is
one of that stream's queries (the `[P, kv, T, d]` prefix never expanded to rows). The two
partial results are merged in float32 by their log-sum-exps, which equals one softmax over
`[prefix ; cache]`. Off the CPU, and under autograd, the same split is computed with float32
matmuls.

The matching mask function is registered too: without one, transformers skips mask
creation for unknown attention names (padding silently ignored), and the stock sdpa mask
may return `None` so that sdpa's `is_causal` shortcut drops real keys once the prefix makes
kv longer than q. Ours always materialises the mask.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "parscale_sdpa"  # contains "sdpa" so transformers' sdpa dispatch checks pass


def expand_prefix(prefix: torch.Tensor, batch: int) -> torch.Tensor:
    """`[P, kv, T, d] -> [(P b), kv, T, d]`, stream-major like the replicated batch (row n*B + b)."""
    return prefix.repeat_interleave(batch, dim=0)


def widen_mask(mask: torch.Tensor | None, n_prefix: int, q_len: int, kv_len: int) -> torch.Tensor | None:
    """Prepend `n_prefix` always-visible key columns to a 4D sdpa/eager mask.

    A `None` mask means plain causal attention: for one query it stays `None` (it sees every
    key), for several we build the bottom-right aligned causal mask over the real keys.
    """
    if mask is None:
        if q_len == 1:
            return None
        # query i (of the last q_len positions) sees real keys up to kv_len - q_len + i
        mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(diagonal=kv_len - q_len)[None, None]  # 1 1 q kv
    rows = mask.shape[0]
    if mask.dtype == torch.bool:
        visible = torch.ones(rows, 1, mask.shape[2], n_prefix, dtype=torch.bool, device=mask.device)
    else:  # additive float mask: 0 = visible
        visible = torch.zeros(rows, 1, mask.shape[2], n_prefix, dtype=mask.dtype, device=mask.device)
    return torch.cat([visible, mask.expand(rows, 1, mask.shape[2], -1)], dim=-1)  # rows 1 q (T+kv)


def parscale_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over `[prefix of the row's stream ; real keys]`; registered as `parscale_sdpa`."""
    prefix_k = getattr(module, "prefix_k", None)
    if prefix_k is None:  # a layer without prefixes (P = 1) is plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    n_streams, n_prefix = prefix_k.shape[0], prefix_k.shape[2]
    rows, q_len, kv_len = key.shape[0], query.shape[2], key.shape[2]
    if rows % n_streams:
        raise ValueError(f"attention got {rows} rows, not a multiple of the {n_streams} streams")
    batch = rows // n_streams
    if q_len == 1 and not (module.training and kwargs.get("dropout", 0.0)):
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        return decode_attention(query, key, value, attention_mask, prefix_k, module.prefix_v, scaling), None
    key = torch.cat([expand_prefix(prefix_k, batch).to(key.dtype), key], dim=2)  # rows kv (T+L) d
    value = torch.cat([expand_prefix(module.prefix_v, batch).to(value.dtype), value], dim=2)
    mask = widen_mask(attention_mask, n_prefix, q_len, kv_len)
    if mask is not None:
        mask = mask.to(query.device)
    kwargs["is_causal"] = False  # causality is in the mask; the prefix makes kv longer than q
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


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
    log-sum-exps, which is the softmax over the joined keys.
    """
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, prefix_k, prefix_v))
    # Kept on the float32 path: off the CPU (the fused kernel is CPU-only), and under autograd
    # (the kernel's log-sum-exp has no gradient, so the merge would drop part of it).
    if query.device.type != "cpu" or _flash_cpu is None or tracked:
        return _decode_attention_float32(query, key, value, mask, prefix_k, prefix_v, scaling)
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


def _decode_attention_float32(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                              prefix_k: torch.Tensor, prefix_v: torch.Tensor, scaling: float) -> torch.Tensor:
    """`decode_attention` off the CPU and under autograd: scores and one softmax over both parts, in float32."""
    rows, heads, _, dim = query.shape
    n_streams, kv, n_prefix, _ = prefix_k.shape
    groups, batch = heads // kv, rows // n_streams
    q = query.reshape(rows, kv, groups, dim).float()  # rows kv g d (heads are kv-major)
    cache_scores = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # rows kv g L
    if mask is not None:
        mask = mask[..., -1:, :].reshape(mask.shape[0], 1, 1, -1).to(cache_scores.device)  # rows|1 1 1 L
        if mask.dtype == torch.bool:
            cache_scores = cache_scores.masked_fill(~mask, float("-inf"))
        else:
            cache_scores = cache_scores + mask.float()
    q_streams = q.reshape(n_streams, batch, kv, groups, dim)  # P b kv g d (rows are stream-major)
    prefix_scores = torch.einsum("pbkgd,pktd->pbkgt", q_streams, prefix_k.float()) * scaling
    scores = torch.cat([prefix_scores.reshape(rows, kv, groups, n_prefix), cache_scores], dim=-1)  # rows kv g (T+L)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs[..., n_prefix:], value.float())  # rows kv g d
    prefix_probs = probs[..., :n_prefix].reshape(n_streams, batch, kv, groups, n_prefix)
    out = out + torch.einsum("pbkgt,pktd->pbkgd", prefix_probs, prefix_v.float()).reshape(rows, kv, groups, dim)
    return out.reshape(rows, 1, heads, dim).to(query.dtype)  # rows 1 heads d


def parscale_sdpa_mask(*args, **kwargs) -> torch.Tensor:
    """The stock sdpa mask, but never `None`: `parscale_attention` widens it."""
    kwargs["allow_is_causal_skip"] = False
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(*args, **kwargs)


def register_attention() -> str:
    """Register the attention and mask functions (idempotent) and return their name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, parscale_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, parscale_sdpa_mask)
    return ATTN_IMPLEMENTATION


def add_prefixes(attention: nn.Module, n_streams: int, n_kv_heads: int, n_prefix: int, head_dim: int) -> None:
    """Give one attention module zero-filled `prefix_k`/`prefix_v`; initialise them afterwards."""
    ref = next(attention.parameters())
    shape = (n_streams, n_kv_heads, n_prefix, head_dim)
    attention.prefix_k = nn.Parameter(torch.zeros(shape, dtype=ref.dtype, device=ref.device))
    attention.prefix_v = nn.Parameter(torch.zeros(shape, dtype=ref.dtype, device=ref.device))


def init_prefixes_normal(attentions: list[nn.Module], generator: torch.Generator, std: float = 0.02) -> None:
    """Draw every prefix from N(0, std) with `generator` (CPU), independent of the backbone's RNG.

    Non-zero draws matter: identical (e.g. zero) prefixes give identical streams, which get
    identical gradients and never diverge.
    """
    with torch.no_grad():
        for attention in attentions:
            for param in (attention.prefix_k, attention.prefix_v):
                draw = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
                param.copy_(draw.to(param.dtype))



class PrefixEncoder(nn.Module):
    """The reparameterised prefix: every layer's K/V prefixes produced by one small MLP.

    P-tuning v2's and PEFT's `prefix_projection` (users of the authors' code adopted it against
    NaNs in the first layer): a learnable embedding per stream and prefix slot, `[P*T, H]`,
    through `Linear(H, N) -> tanh -> Linear(N, layers*2*kv*d)`. Hand-written rather than PEFT's
    `PrefixEncoder` because ours yields the released `[P, kv, T, d]` layout per layer and draws
    its initialisation from an explicit generator.
    """

    def __init__(self, n_streams: int, n_prefix: int, embed_dim: int, hidden: int, n_layers: int,
                 n_kv_heads: int, head_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.shape = (n_streams, n_prefix, n_layers, 2, n_kv_heads, head_dim)
        self.embedding = nn.Parameter(torch.zeros(n_streams * n_prefix, embed_dim, device=device, dtype=dtype))
        out = n_layers * 2 * n_kv_heads * head_dim
        # skip_init: no draw from the global RNG; zeros until `reset_parameters` or a state dict fills them.
        self.mlp = nn.Sequential(skip_init(nn.Linear, embed_dim, hidden, device=device, dtype=dtype), nn.Tanh(),
                                 skip_init(nn.Linear, hidden, out, device=device, dtype=dtype))
        with torch.no_grad():
            for param in self.mlp.parameters():
                param.zero_()

    def reset_parameters(self, generator: torch.Generator, std: float) -> None:
        """Embedding N(0, 1), first layer U(±1/sqrt(fan_in)), then the last layer scaled so the
        initial prefixes have standard deviation `std`, the scale a directly learned prefix starts at."""
        from parscale.model.aggregation import uniform_fan_in_

        with torch.no_grad():
            self.embedding.copy_(torch.randn(self.embedding.shape, generator=generator).to(self.embedding.dtype))
            for layer in (self.mlp[0], self.mlp[2]):
                uniform_fan_in_(layer.weight, generator)
                layer.bias.zero_()
            self.mlp[2].weight.mul_(std / self.forward().float().std())

    def forward(self) -> torch.Tensor:
        """`[layers, 2, P, kv, T, d]`: the (K, V) prefixes of every layer."""
        flat = self.mlp(self.embedding)  # (P T) (layers 2 kv d)
        return flat.view(self.shape).permute(2, 3, 0, 4, 1, 5).contiguous()  # layers 2 P kv T d


def install_encoded_prefixes(attentions: list[nn.Module], encoder: PrefixEncoder) -> None:
    """Set each attention module's `prefix_k`/`prefix_v` to the encoder's current output
    (plain tensors in the autograd graph, recomputed every forward so that they train)."""
    prefixes = encoder()  # layers 2 P kv T d
    for attention, (k, v) in zip(attentions, prefixes):
        attention.prefix_k, attention.prefix_v = k, v
