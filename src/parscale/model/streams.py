"""The prefix bank: each stream's learnable key/value prefix in every attention layer.

Each attention module of a P > 1 model owns `prefix_k` and `prefix_v`, both
`[P, n_kv_heads, n_prefix_tokens, head_dim]` (the released checkpoints' names and shapes);
`attention` reads them there. Or one small MLP produces them all (`PrefixEncoder`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init


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
