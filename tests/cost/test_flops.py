"""Training FLOPs against a hand count on a shape small enough to count every multiply."""
from __future__ import annotations

from parscale.cost.flops import training_flops
from parscale.cost.roofline import ModelShape

# 1 layer, hidden 4, FFN 8, 2 heads of 2, 1 KV head, vocab 10, no biases.
SHAPE = ModelShape(layers=1, hidden=4, intermediate=8, heads=2, kv_heads=1, vocab=10, qkv_bias=False)


def test_p1_full_and_frozen_match_a_hand_count():
    # MACs per row: q 4x4=16, k 4x2=8, v 8, o 16, gate/up/down 3x4x8=96 -> 144, forward 2x = 288.
    # Attention, T=3: a token sees (3+1)/2 = 2 keys on average; q.k and a.v: 2 x 2 x 4 x 2 = 32.
    # lm_head: 2 x 4 x 10 = 80. Forward 400 per token; training 3x (full) or 2x (frozen).
    assert training_flops(SHAPE, n_streams=1, tokens=5, seq_len=3, prefix_tokens=0) == 5 * 3 * 400
    assert training_flops(SHAPE, n_streams=1, tokens=5, seq_len=3, prefix_tokens=0, frozen_backbone=True) == 5 * 2 * 400


def test_streams_and_prefix_match_a_hand_count():
    # P=2, one prefix slot: keys 2 + 1 = 3, attention 2 x 2 x 4 x 3 = 48; backbone 2 x (288 + 48) = 672.
    # Aggregation Linear(8, 4) + Linear(4, 2): 2 x (2x4x4 + 4x2) = 80 (trainable even when frozen). lm_head 80.
    full = 3 * (672 + 80) + 3 * 80
    frozen = 2 * (672 + 80) + 3 * 80
    assert training_flops(SHAPE, n_streams=2, tokens=1, seq_len=3, prefix_tokens=1) == full
    assert training_flops(SHAPE, n_streams=2, tokens=1, seq_len=3, prefix_tokens=1, frozen_backbone=True) == frozen
