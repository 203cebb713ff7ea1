"""The aggregation head: P per-stream hidden states -> one hidden state per token.

The released code feeds an MLP with the streams *interleaved* (feature `h*P + n`), takes
a float32 softmax over the P outputs, smooths it and forms the weighted sum in float32.
The pure functions below are that recipe step by step, so that tests and other modules
(adapters, analysis) can reuse each step on its own.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import skip_init


def interleave_streams(hidden: torch.Tensor, n_streams: int) -> torch.Tensor:
    """`(n b) s h -> b s (h n)`: the MLP input, feature index `h*P + n`."""
    rows, seq, dim = hidden.shape
    if rows % n_streams:
        raise ValueError(f"{rows} rows cannot hold {n_streams} stream blocks")
    batch = rows // n_streams
    stacked = hidden.view(n_streams, batch, seq, dim)  # n b s h
    return stacked.permute(1, 2, 3, 0).reshape(batch, seq, dim * n_streams)  # b s (h n)


def split_streams(hidden: torch.Tensor, n_streams: int) -> torch.Tensor:
    """`(n b) s h -> b s n h`: each token's P stream states side by side."""
    rows, seq, dim = hidden.shape
    batch = rows // n_streams
    return hidden.view(n_streams, batch, seq, dim).permute(1, 2, 0, 3)  # b s n h


def smooth_weights(weights: torch.Tensor, eps: float) -> torch.Tensor:
    """`w*(1-eps) + eps/P` along the last axis; keeps every stream alive (also at inference)."""
    if eps <= 0:
        return weights
    return weights * (1.0 - eps) + eps / weights.shape[-1]


def weighted_sum(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_n w_n h_n in float32, cast back to the hidden states' dtype.

    hidden: `(n b) s h`; weights: `b s n`. Returns `b s h`.
    """
    n_streams = weights.shape[-1]
    per_stream = split_streams(hidden, n_streams).float()  # b s n h
    mixed = (per_stream * weights.float().unsqueeze(-1)).sum(dim=2)  # b s h
    return mixed.to(hidden.dtype)


def uniform_fan_in_(weight: torch.Tensor, generator: torch.Generator) -> None:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), torch's Linear default bound, but from `generator`."""
    bound = 1.0 / math.sqrt(weight.shape[1])
    with torch.no_grad():
        draw = torch.rand(weight.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
        weight.copy_(draw.to(weight.dtype))


class AggregationHead(nn.Sequential):
    """`Linear(P*H, H) -> SiLU -> Linear(H, P)` over the interleaved streams, then softmax.

    A Sequential so that its state-dict keys are the released `aggregate_layer` names
    (`0.weight`, `0.bias`, `2.weight`, `2.bias`); `forward` does the whole aggregation.
    """

    def __init__(self, hidden_size: int, n_streams: int, attn_smooth: float, device=None, dtype=None) -> None:
        # skip_init: no draw from the global RNG; `reset_parameters` uses an explicit generator.
        super().__init__(
            skip_init(nn.Linear, n_streams * hidden_size, hidden_size, device=device, dtype=dtype),
            nn.SiLU(),
            skip_init(nn.Linear, hidden_size, n_streams, device=device, dtype=dtype),
        )
        self.n_streams = n_streams
        self.attn_smooth = attn_smooth
        self.reset_parameters(torch.Generator().manual_seed(0))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """First layer U(±1/sqrt(fan_in)) with zero bias; last layer zero, so weights start uniform."""
        uniform_fan_in_(self[0].weight, generator)
        with torch.no_grad():
            self[0].bias.zero_()
            self[2].weight.zero_()
            self[2].bias.zero_()

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLP logits `b s n` (model dtype) for hidden states `(n b) s h`."""
        x = interleave_streams(hidden, self.n_streams)  # b s (h n)
        return self[2](self[1](self[0](x)))

    def stream_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """Smoothed float32 weights `b s n` for hidden states `(n b) s h`."""
        weights = torch.softmax(self.scores(hidden).float(), dim=-1)
        return smooth_weights(weights, self.attn_smooth)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(n b) s h` -> `b s h`."""
        return weighted_sum(hidden, self.stream_weights(hidden))
