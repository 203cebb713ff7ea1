"""Llama, Mistral and Gemma backbones against a float64 reference written from the recipe.

The same check `test_format.py` makes for the released Qwen2 layout, for the other
supported families, whose quirks the reference spells out (Gemma scales the embeddings by
sqrt(H), normalises with (1 + w) and uses a tanh-GELU MLP; Llama and Mistral keep an untied
lm_head). Per stream: embeddings, layers with the stream's prefix joined after rotary
(never rotated) and visible to every query, the final norm; then the interleaved
aggregation MLP, softmax, smoothing toward uniform and the weighted sum; then lm_head. A
loop over streams, positions and heads, sharing no code with the wrapper.
"""
from __future__ import annotations

import math

import pytest
import torch

from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import to_parscale

P, N_PREFIX, SMOOTH = 3, 4, 0.1


def _silu(x):
    return x * torch.sigmoid(x)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


class Reference:
    def __init__(self, model, family: str) -> None:
        cfg = model.config
        self.w = {k: v.detach().double() for k, v in model.state_dict().items()}
        self.gemma = family == "gemma"
        self.layers, self.eps = cfg.num_hidden_layers, cfg.rms_norm_eps
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.theta = cfg.rope_parameters["rope_theta"]
        self.hidden = cfg.hidden_size

    def norm(self, x, weight):
        normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed * (1 + weight) if self.gemma else normed * weight

    def rotary(self, x):  # x: L heads d
        d = self.d
        inv_freq = 1.0 / self.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.arange(x.shape[0], dtype=torch.float64)[:, None] * inv_freq[None]  # L d/2
        cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
        return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin

    def linear(self, x, name):
        bias = self.w.get(name + ".bias")
        return x @ self.w[name + ".weight"].T + (0 if bias is None else bias)

    def layer(self, x, i, stream):
        w, p, L = self.w, f"model.layers.{i}.", x.shape[0]
        h = self.norm(x, w[p + "input_layernorm.weight"])
        q = self.rotary(self.linear(h, p + "self_attn.q_proj").view(L, self.nh, self.d))
        k = self.rotary(self.linear(h, p + "self_attn.k_proj").view(L, self.nkv, self.d))
        v = self.linear(h, p + "self_attn.v_proj").view(L, self.nkv, self.d)
        k = torch.cat([w[p + "self_attn.prefix_k"][stream].transpose(0, 1), k])  # (T+L) kv d
        v = torch.cat([w[p + "self_attn.prefix_v"][stream].transpose(0, 1), v])
        heads = []
        for head in range(self.nh):
            kv = head // (self.nh // self.nkv)
            out = torch.zeros(L, self.d, dtype=torch.float64)
            for t in range(L):
                visible = N_PREFIX + t + 1  # the whole prefix, then real keys 0..t
                scores = k[:visible, kv] @ q[t, head] / math.sqrt(self.d)
                out[t] = torch.softmax(scores, 0) @ v[:visible, kv]
            heads.append(out)
        x = x + self.linear(torch.cat(heads, -1), p + "self_attn.o_proj")
        h = self.norm(x, w[p + "post_attention_layernorm.weight"])
        act = _gelu_tanh if self.gemma else _silu
        return x + self.linear(act(self.linear(h, p + "mlp.gate_proj")) * self.linear(h, p + "mlp.up_proj"),
                               p + "mlp.down_proj")

    def logits(self, ids: list[int]) -> torch.Tensor:
        w = self.w
        x0 = w["model.embed_tokens.weight"][ids] * (math.sqrt(self.hidden) if self.gemma else 1.0)
        finals = []
        for stream in range(P):
            x = x0
            for i in range(self.layers):
                x = self.layer(x, i, stream)
            finals.append(self.norm(x, w["model.norm.weight"]))
        feats = torch.stack(finals, -1).reshape(len(ids), self.hidden * P)  # feature h*P + n
        scores = self.linear(_silu(self.linear(feats, "model.aggregate_layer.0")), "model.aggregate_layer.2")
        weight = torch.softmax(scores, -1) * (1 - SMOOTH) + SMOOTH / P
        y = sum(weight[:, n, None] * finals[n] for n in range(P))
        return y @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma"])
def test_backbone_matches_the_float64_reference(tiny_factory, family):
    model = to_parscale(tiny_factory(family), ParScaleConfig(P, N_PREFIX, SMOOTH), seed=1).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # every weight moved off its init: norms off 1 (or 0), a live aggregation
        for name, param in model.named_parameters():
            scale = 0.5 if "prefix" in name or "aggregate_layer.2" in name else 0.1
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    samples = [[5, 17, 3, 44, 9, 60, 2], [8, 30, 11, 70, 21, 4, 90]]
    with torch.no_grad():
        logits = model(torch.tensor(samples)).logits.double()
    reference = Reference(model, family)
    for row, sample in enumerate(samples):
        # float32 model vs float64 reference on O(1) logits: 1e-4 is ~100x float32 rounding here.
        torch.testing.assert_close(logits[row], reference.logits(sample), rtol=1e-4, atol=1e-4)
