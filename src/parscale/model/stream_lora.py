"""Per-stream low-rank adapters on the attention projections (ND-LoRA's stream-specific LoRA).

The prefixes are the only thing that tells P streams apart, and in our runs the streams stay
~0.99 alike. ND-LoRA (arXiv 2510.20690) gives each stream its own LoRA as well: every
attention projection (q, k, v, o) computes, for the rows of stream s,

    y = W x + b + scale * B_s (A_s x),      A_s [R, in], B_s [out, R], scale = alpha / R

with A_s drawn like PEFT's LoRA A (kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(in))) and
B_s zero, so a new model computes exactly what it computed without them.

The adapters live on the projection itself, as `stream_lora_A` `[P, R, in]` and
`stream_lora_B` `[P, out, R]` (state-dict keys `model.layers.{i}.self_attn.q_proj.stream_lora_A`,
...), and act through a forward hook, not a subclass: the backbone's modules, classes and keys
stay the released ones, the decode kernel's class swap (`kernels.SkinnyLinear`) keeps the hook,
and `quantize_int8` can replace the projection and hand the adapters to its replacement
(`detach`, `attach`), which keeps them in float. Rows are stream-major (row s*B + b is stream s
of sample b) in training, prefill, decoding and beam search alike, so the hook needs nothing
but the rows.
"""
from __future__ import annotations

import torch
from torch import nn

from parscale.errors import UserError
from parscale.model import introspect
from parscale.model.aggregation import uniform_fan_in_

A_NAME, B_NAME, SCALE_NAME = "stream_lora_A", "stream_lora_B", "stream_lora_scale"
MARKER = ".stream_lora_"  # in the state-dict keys of the adapters, and of nothing else


def stream_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale * B_s (A_s x)` for the rows of each stream s: x `(n b) ... in` -> `(n b) ... out`."""
    n_streams, dim = lora_a.shape[0], x.shape[-1]
    if x.shape[0] % n_streams:
        raise UserError(f"a projection with {n_streams} stream adapters got {x.shape[0]} rows, not a multiple of "
                        f"P={n_streams}; run the ParScale model, not its bare decoder")
    per = x.reshape(n_streams, -1, dim).to(lora_a.dtype)  # n (b ...) in: each stream's rows
    low = torch.bmm(per, lora_a.transpose(1, 2))  # n (b ...) r
    out = torch.bmm(low, lora_b.transpose(1, 2))  # n (b ...) out
    return (out * scale).reshape(*x.shape[:-1], lora_b.shape[1])  # (n b) ... out


def _add_stream_delta(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """The forward hook: the projection's own output plus its streams' low-rank terms."""
    if not args:
        raise UserError("a projection with stream adapters must be called with its input as the first argument")
    delta = stream_delta(args[0], getattr(module, A_NAME), getattr(module, B_NAME), getattr(module, SCALE_NAME))
    return output + delta.to(output.dtype)


def attach(linear: nn.Module, lora_a: nn.Parameter, lora_b: nn.Parameter, scale: float) -> None:
    """Give one projection its stream adapters (these very tensors) and the hook that applies them."""
    if hasattr(linear, A_NAME):
        raise ValueError("this projection already has stream adapters; detach them first")
    setattr(linear, A_NAME, lora_a)
    setattr(linear, B_NAME, lora_b)
    setattr(linear, SCALE_NAME, float(scale))
    linear.register_forward_hook(_add_stream_delta)


def detach(linear: nn.Module) -> tuple[nn.Parameter, nn.Parameter, float] | None:
    """Remove one projection's adapters and hook; returns (A, B, scale), or None if it had none."""
    if not hasattr(linear, A_NAME):
        return None
    found = (getattr(linear, A_NAME), getattr(linear, B_NAME), getattr(linear, SCALE_NAME))
    for key, hook in list(linear._forward_hooks.items()):  # the handle is not kept: copies of the model share none
        if hook is _add_stream_delta:
            del linear._forward_hooks[key]
    for name in (A_NAME, B_NAME, SCALE_NAME):
        delattr(linear, name)
    return found


def projections(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(attention module, projection name) of every adapted projection, in layer order."""
    return [(attention, name) for attention, names in zip(introspect.attention_modules(model),
                                                          introspect.attention_projections(model))
            for name in names]


def empty_adapters(model: nn.Module, n_streams: int, rank: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """Zero-filled (A, B) for every projection of `model`, on its device and in its dtype."""
    ref = model.get_input_embeddings().weight  # never quantized: the model's dtype and device
    kw = dict(dtype=ref.dtype, device=ref.device)
    out = []
    for attention, name in projections(model):
        linear = getattr(attention, name)
        out.append((nn.Parameter(torch.zeros(n_streams, rank, linear.in_features, **kw)),
                    nn.Parameter(torch.zeros(n_streams, linear.out_features, rank, **kw))))
    return out


def installed(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """The (A, B) now on the projections (the very tensors); empty when there are none."""
    linears = [getattr(attention, name) for attention, name in projections(model)]
    found = [(getattr(linear, A_NAME, None), getattr(linear, B_NAME, None)) for linear in linears]
    return [] if all(a is None for a, _ in found) else found


def install(model: nn.Module, adapters: list[tuple[nn.Parameter, nn.Parameter]], scale: float) -> None:
    """Remove every projection's adapters, then attach `adapters` (none: the plain projections)."""
    targets = projections(model)
    for attention, name in targets:
        detach(getattr(attention, name))
    if adapters and len(adapters) != len(targets):
        raise ValueError(f"{len(adapters)} adapter pairs for {len(targets)} projections")
    for (attention, name), (lora_a, lora_b) in zip(targets, adapters):
        attach(getattr(attention, name), lora_a, lora_b, scale)


def init_adapters(model: nn.Module, generator: torch.Generator) -> None:
    """A ~ U(+-1/sqrt(in)) from `generator` (PEFT's kaiming-uniform with a = sqrt(5)), B = 0."""
    with torch.no_grad():
        for lora_a, lora_b in installed(model):
            for stream in range(lora_a.shape[0]):
                uniform_fan_in_(lora_a[stream], generator)
            lora_b.zero_()
