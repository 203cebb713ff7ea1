"""How different the streams are: the numbers that say whether P > 1 is more than one stream.

Earlier runs at tiny scale found the streams' final hidden states about 0.99 cosine-similar and
the aggregation choosing one stream. These functions measure both (and the trainer's optional
similarity penalty reuses `pairwise_cosine`, differentiably, on its positive part):
- `pairwise_cosine`: the mean over token positions and stream pairs of the cosine between two
  streams' final hidden states (after each stream's final norm, before aggregation);
- `cross_correlation`: the mean squared cross-correlation between two streams' standardised
  features (0: no feature of one stream is linearly related to any feature of another), which
  the trainer's optional decorrelation loss minimises;
- `weight_stats`: the aggregation's mean largest weight and its mean entropy relative to
  log P (1 = uniform weights, 0 = one stream takes everything), both of the smoothed weights
  the model uses, so smoothing eps bounds the top weight by 1 - eps + eps/P.
A P = 1 model (also the one-prefix control) has a single stream, so neither number exists for it.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn


def pairwise_cosine(hidden: torch.Tensor, n_streams: int, positive: bool = False) -> torch.Tensor:
    """Mean pairwise cosine of the streams' states, `(n b) s h` -> a scalar (differentiable).

    `positive` averages max(cos, 0) instead: what the similarity penalty minimises, because a
    penalty on the signed cosine is gamed at P = 2 by two antiparallel streams (cosine -1), of
    which the aggregation then keeps one. Computed in at least float32 (float64 stays float64)."""
    rows, seq, dim = hidden.shape
    if n_streams < 2 or rows % n_streams:
        raise ValueError(f"pairwise_cosine needs P >= 2 stream blocks, got {rows} rows for P={n_streams}")
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    per = nn.functional.normalize(hidden.to(dtype).view(n_streams, rows // n_streams, seq, dim), dim=-1)  # n b s h
    gram = torch.einsum("nbsh,mbsh->bsnm", per, per)  # b s n n
    upper = torch.triu_indices(n_streams, n_streams, offset=1, device=hidden.device)
    pairs = gram[..., upper[0], upper[1]]
    return (pairs.clamp_min(0) if positive else pairs).mean()  # over tokens and the P(P-1)/2 pairs


def cross_correlation(hidden: torch.Tensor, n_streams: int, eps: float = 1e-5) -> torch.Tensor:
    """Mean squared cross-correlation of the streams' features, `(n b) s h` -> a scalar in [0, 1].

    Every feature i of stream p is standardised over the N = b*s token positions,
    z = (x - mean) / sqrt(var + eps) (population variance), and for every pair p < q

        C^{pq}_{ij} = (1/N) sum_t z^p_{t,i} z^q_{t,j}          (H x H)
        L = 2 / (P (P - 1)) * sum_{p<q} (1 / H^2) * sum_{i,j} (C^{pq}_{ij})^2

    Source: Barlow Twins' cross-correlation matrix (Zbontar et al. 2021, arXiv 2103.03230),
    which ND-LoRA (arXiv 2510.20690) computes between every two streams to decorrelate them.
    Its released code, like Barlow Twins, pushes C toward the identity; two identical streams
    whose features are decorrelated already reach that, so it does not penalise the collapse
    seen in our runs. Here every entry is pushed toward 0. The diagonal C_ii (feature i in two streams) is 1 for
    collapsed streams; the off-diagonal entries catch a stream that merely permutes or mixes
    another's features. Squared, so antiparallel streams (C = -1) count as collapsed, unlike
    the signed cosine. Computed in at least float32 (float64 stays float64); differentiable."""
    rows, seq, dim = hidden.shape
    if n_streams < 2 or rows % n_streams:
        raise ValueError(f"cross_correlation needs P >= 2 stream blocks, got {rows} rows for P={n_streams}")
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    per = hidden.to(dtype).reshape(n_streams, -1, dim)  # n (b s) h: the N positions of each stream
    centred = per - per.mean(dim=1, keepdim=True)
    z = centred / (centred.pow(2).mean(dim=1, keepdim=True) + eps).sqrt()  # n N h, standardised
    pairs = [(z[p].T @ z[q] / z.shape[1]).pow(2).mean()  # C^{pq}: h h
             for p in range(n_streams) for q in range(p + 1, n_streams)]
    return torch.stack(pairs).mean()


def weight_stats(weights: torch.Tensor) -> dict[str, float]:
    """Mean largest weight and mean entropy / log P of aggregation weights `b s n`."""
    w = weights.double()
    n_streams = w.shape[-1]
    entropy = -(w * w.clamp_min(1e-300).log()).sum(-1)  # b s
    return {"top_weight": float(w.max(-1).values.mean()),
            "weight_entropy": float(entropy.mean() / math.log(n_streams))}


@contextlib.contextmanager
def capture_stream_states(model: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """Collect the `(n b) s h` states entering the aggregation during forwards inside the block.

    Yields an empty list when `enabled` is False or the model has no aggregation (P = 1)."""
    seen: list[torch.Tensor] = []
    head = getattr(getattr(model, "model", None), "aggregate_layer", None)
    if not enabled or head is None:
        yield seen
        return
    hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        yield seen
    finally:
        hook.remove()


def stream_diagnostics(model: nn.Module, input_ids: torch.Tensor) -> dict[str, float] | None:
    """`stream_cosine`, `stream_correlation` (see `cross_correlation`), `top_weight` and
    `weight_entropy` of `model` on `input_ids` `b s`; None at P = 1."""
    config = getattr(model, "parscale_config", None)
    if config is None or config.n_streams < 2:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_stream_states(model) as seen:
            model(input_ids=input_ids)
            hidden = seen[0]  # (n b) s h
            weights = model.model.aggregate_layer.stream_weights(hidden)  # b s n
    finally:
        model.train(was_training)
    return {"stream_cosine": float(pairwise_cosine(hidden, config.n_streams)),
            "stream_correlation": float(cross_correlation(hidden, config.n_streams)), **weight_stats(weights)}
