"""Training FLOPs of a run: the 6·N·D rule of thumb, spelled out for P streams.

Per token and stream, a forward pass costs 2 FLOPs per multiply-accumulate of the backbone's
matrices, plus attention's scores and weighted values over the keys a token sees (on average
(T+1)/2 real keys in a causal window of T, plus the prefix). The backbone runs on P rows;
the aggregation head and the lm_head run once per token. A full training step costs three
forward passes (the forward, the gradient of the activations, the gradient of the weights);
with a frozen backbone the backbone's weight gradients are skipped, so two (Kaplan et al.
2020, section 2.1; nanoGPT's `estimate_mfu` counts the same terms).
"""
from __future__ import annotations

from parscale.cost.roofline import ModelShape, attention_params, mlp_params


def forward_flops_per_token(s: ModelShape, n_streams: int, seq_len: int, prefix_tokens: int) -> dict[str, float]:
    """Forward FLOPs per token, by part: `backbone` (all P rows), `aggregation`, `lm_head`."""
    bias = s.hidden + 2 * s.kv_dim if s.qkv_bias else 0
    matmul = s.layers * (attention_params(s) - bias + mlp_params(s))  # multiply-accumulates per row
    keys = (seq_len + 1) / 2 + prefix_tokens
    attention = s.layers * 2 * 2 * s.hidden * keys  # q·k and a·v over every head
    aggregation = 2 * (n_streams * s.hidden * s.hidden + s.hidden * n_streams) if n_streams > 1 else 0
    return {"backbone": n_streams * (2 * matmul + attention), "aggregation": aggregation,
            "lm_head": 2 * s.hidden * s.vocab}


def training_flops(s: ModelShape, *, n_streams: int, tokens: int, seq_len: int, prefix_tokens: int,
                   frozen_backbone: bool = False) -> float:
    """FLOPs of training on `tokens` tokens (`prefix_tokens` = 0 for a model without prefixes)."""
    part = forward_flops_per_token(s, n_streams, seq_len, prefix_tokens)
    frozen = 2 if frozen_backbone else 3  # the lm_head is part of the frozen backbone
    return float(tokens * (frozen * (part["backbone"] + part["lm_head"]) + 3 * part["aggregation"]))
