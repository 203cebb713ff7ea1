"""Stream diagnostics against plain loops: pairwise cosine and squared cross-correlation of the
streams' final hidden states, and the aggregation's top weight and relative entropy, recomputed
here from the backbone and the aggregation head's weights in float64."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from parscale.model.config import ParScaleConfig
from parscale.model.diagnostics import cross_correlation, pairwise_cosine, stream_diagnostics, weight_stats
from parscale.model.wrapper import to_parscale


def _loop_cosine(states: list[torch.Tensor], positive: bool = False) -> float:
    """states: P tensors `b s h`; the mean over pairs i < j and tokens of cos(h_i, h_j) (or of
    max(cos, 0)), float64."""
    values = []
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            for b in range(states[i].shape[0]):
                for s in range(states[i].shape[1]):
                    cos = float(F.cosine_similarity(states[i][b, s].double(), states[j][b, s].double(), dim=0))
                    values.append(max(cos, 0.0) if positive else cos)
    return sum(values) / len(values)


@pytest.mark.parametrize("n_streams", [2, 3, 4])
def test_pairwise_cosine_equals_a_loop_over_pairs(n_streams):
    gen = torch.Generator().manual_seed(n_streams)
    base = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    states = [base + 0.7 * torch.randn(2, 5, 6, generator=gen, dtype=torch.float64) for _ in range(n_streams)]
    hidden = torch.cat(states)  # (n b) s h, stream-major as in the model
    got = pairwise_cosine(hidden, n_streams)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(_loop_cosine(states), abs=1e-12)
    assert float(pairwise_cosine(torch.cat([states[0]] * n_streams), n_streams)) == pytest.approx(1.0, abs=1e-12)
    flipped = [states[0], -states[1], *states[2:]]  # negative cosines, so the positive part differs
    assert float(pairwise_cosine(torch.cat(flipped), n_streams, positive=True)) == \
        pytest.approx(_loop_cosine(flipped, positive=True), abs=1e-12)
    assert _loop_cosine(flipped, positive=True) != pytest.approx(_loop_cosine(flipped), abs=1e-3)


def test_positive_part_is_zero_for_antiparallel_or_orthogonal_streams_and_one_for_identical():
    # The signed cosine rewarded two antiparallel streams (-1): a similarity penalty of 1.0 was gamed so in a run.
    a = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    orth = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)  # two streams of one token: (n b) s h
    assert float(pairwise_cosine(torch.cat([a, -a]), 2)) == pytest.approx(-1.0)
    assert float(pairwise_cosine(torch.cat([a, -a]), 2, positive=True)) == 0.0
    assert float(pairwise_cosine(orth, 2, positive=True)) == 0.0
    assert float(pairwise_cosine(torch.cat([a, a]), 2, positive=True)) == pytest.approx(1.0)


def _loop_cross_correlation(states: list[torch.Tensor], eps: float = 1e-5) -> float:
    """states: P tensors `b s h`; for each pair i < j the mean over features f, g of the squared
    correlation between feature f of stream i and feature g of stream j over the b*s positions,
    then the mean over pairs. Plain Python floats."""
    def standardised(state):  # one list of N values per feature
        columns = [[float(v) for v in state[..., f].reshape(-1)] for f in range(state.shape[-1])]
        out = []
        for col in columns:
            mean = sum(col) / len(col)
            var = sum((v - mean) ** 2 for v in col) / len(col)
            out.append([(v - mean) / math.sqrt(var + eps) for v in col])
        return out

    per_pair = []
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            zi, zj = standardised(states[i]), standardised(states[j])
            n = len(zi[0])
            squares = [(sum(a * b for a, b in zip(fi, gj)) / n) ** 2 for fi in zi for gj in zj]
            per_pair.append(sum(squares) / len(squares))
    return sum(per_pair) / len(per_pair)


@pytest.mark.parametrize("n_streams", [2, 3, 4])
def test_cross_correlation_equals_a_loop_over_pairs_and_features(n_streams):
    gen = torch.Generator().manual_seed(10 + n_streams)
    base = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    states = [base + 0.7 * torch.randn(2, 5, 6, generator=gen, dtype=torch.float64) for _ in range(n_streams)]
    states[0][..., 2] += 3.0  # a shifted, wider feature: the standardisation matters
    states[-1][..., 4] *= 5.0
    got = cross_correlation(torch.cat(states), n_streams)  # (n b) s h, stream-major as in the model
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(_loop_cross_correlation(states), abs=1e-12)
    as_float32 = cross_correlation(torch.cat(states).float(), n_streams)
    assert as_float32.dtype == torch.float32 and float(as_float32) == pytest.approx(float(got), abs=1e-6)
    with pytest.raises(ValueError, match="P >= 2"):
        cross_correlation(torch.cat(states), 1)


def test_cross_correlation_by_hand_collapsed_antiparallel_and_independent_streams():
    """Four positions, two features. a = (1,-1,1,-1) and b = (1,1,-1,-1) are centred, of variance
    1 and orthogonal, so two identical streams (a, b) have C = I / (1 + eps): 2 of 4 entries are
    ~1, the loss ~1/2. Barlow Twins' own target (C -> I) would score this collapse 0. A negated
    stream gives C = -I, the same loss; a stream made of c = (1,-1,-1,1), orthogonal to a and b,
    gives C = 0."""
    a, b, c = (torch.tensor(v, dtype=torch.float64) for v in ([1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]))
    one = torch.stack([a, b], dim=-1)[None]  # b=1 s=4 h=2
    eps = 1e-5
    collapsed = cross_correlation(torch.cat([one, one]), 2, eps=eps)
    assert float(collapsed) == pytest.approx(2 / 4 / (1 + eps) ** 2, abs=1e-12)
    assert float(cross_correlation(torch.cat([one, -one]), 2, eps=eps)) == pytest.approx(float(collapsed), abs=1e-12)
    other = torch.stack([c, 2 * c + 7], dim=-1)[None]  # shifted and scaled: standardisation removes both
    assert float(cross_correlation(torch.cat([one, other]), 2)) == pytest.approx(0.0, abs=1e-12)
    constant = torch.full_like(one, 3.0)  # no variance: no correlation, and no division by zero
    assert float(cross_correlation(torch.cat([one, constant]), 2)) == 0.0


def test_cross_correlation_passes_gradients_to_every_stream():
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(3 * 2, 4, 5, generator=gen, dtype=torch.float64)
    hidden[2:4] += hidden[:2]  # correlated with stream 0
    hidden.requires_grad_(True)
    cross_correlation(hidden, 3).backward()
    grad = hidden.grad.view(3, 2, 4, 5)  # n b s h
    assert torch.isfinite(grad).all()
    assert all(grad[n].abs().sum() > 0 for n in range(3))
    # the analytic gradient against a central difference in float64
    probe = torch.zeros_like(hidden)
    probe[3, 2, 0] = 1e-6  # row 3: stream 1, sample 1
    with torch.no_grad():
        numeric = (cross_correlation(hidden + probe, 3) - cross_correlation(hidden - probe, 3)) / 2e-6
    assert float(hidden.grad[3, 2, 0]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-10)


def test_weight_stats_by_hand():
    w = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]]])  # b=1 s=3 n=2
    entropies = [0.0, math.log(2), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))]
    got = weight_stats(w)
    assert got["top_weight"] == pytest.approx((1.0 + 0.5 + 0.9) / 3, abs=1e-7)
    assert got["weight_entropy"] == pytest.approx(sum(entropies) / 3 / math.log(2), abs=1e-7)


def test_stream_diagnostics_equal_plain_loops_on_a_tiny_model(tiny_factory):
    n_streams, eps = 3, 0.05
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(n_streams, 4, attn_smooth=eps), seed=2).eval()
    with torch.no_grad():  # non-uniform aggregation weights
        model.model.aggregate_layer[2].weight.normal_(generator=torch.Generator().manual_seed(0))
    ids = torch.randint(2, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    got = stream_diagnostics(model, ids)

    with torch.no_grad():  # the streams' final states straight from the backbone, one stream at a time
        emb = model.get_input_embeddings()(ids)
        rows = model.model(inputs_embeds=emb.repeat(n_streams, 1, 1)).last_hidden_state  # (n b) s h
    states = list(rows.view(n_streams, 2, 6, -1))
    assert got["stream_cosine"] == pytest.approx(_loop_cosine(states), abs=1e-6)
    assert got["stream_correlation"] == pytest.approx(_loop_cross_correlation(states), abs=1e-6)

    head = model.model.aggregate_layer
    w1, b1, w2, b2 = (t.detach().double() for t in (head[0].weight, head[0].bias, head[2].weight, head[2].bias))
    tops, entropies = [], []
    for b in range(2):
        for s in range(6):
            # the released interleaving: feature index h*P + n
            feat = torch.stack([states[n][b, s].double() for n in range(n_streams)], dim=1).flatten()
            hidden = w1 @ feat + b1
            scores = w2 @ (hidden * torch.sigmoid(hidden)) + b2
            weights = torch.softmax(scores, dim=0) * (1 - eps) + eps / n_streams
            tops.append(float(weights.max()))
            entropies.append(float(-(weights * weights.log()).sum()) / math.log(n_streams))
    assert max(tops) - min(tops) > 0.01  # the weights really vary
    assert got["top_weight"] == pytest.approx(sum(tops) / len(tops), abs=1e-6)
    assert got["weight_entropy"] == pytest.approx(sum(entropies) / len(entropies), abs=1e-6)
    assert not model.training


def test_p1_models_have_no_stream_diagnostics(tiny_factory):
    ids = torch.randint(2, 97, (1, 5))
    assert stream_diagnostics(to_parscale(tiny_factory("qwen2"), ParScaleConfig(1)), ids) is None
    control = to_parscale(tiny_factory("qwen2"), ParScaleConfig(1, 3, prefix_at_p1=True))
    assert stream_diagnostics(control, ids) is None
