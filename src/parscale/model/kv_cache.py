"""A KV cache layer that appends in place on CPU instead of concatenating at every step.

transformers' default cache (`DynamicCache` of `DynamicLayer`s) appends each decode step's keys
and values with `torch.cat`, a copy of the whole cache per layer and step: O(L) bytes per token,
O(L^2) over a generation. With P streams the cache has P*B rows, so the copy grows with P: at
P = 8 on the benchmark's 16-layer model it was about 1 ms of a 46 ms bfloat16 step at 96 tokens
(benchmarks/README.md), and it grows with the context. `GrowingLayer` keeps the keys and values
in buffers with room for up to `CHUNK` more tokens and writes each step into the free columns;
`keys`/`values` are views of the filled part, so everything that reads a `DynamicLayer` reads
it unchanged (the decode attention kernel takes the views' strides as they are). A buffer is
copied once per `CHUNK` tokens: 256x fewer bytes than the concatenation, for at most `CHUNK`
tokens of unused room per layer.

`grow_in_place(cache)` turns the plain `DynamicLayer`s of a cache into `GrowingLayer`s (the
class of the object changes, its state stays, as `kernels.enable` does with Linear modules).
The wrapper calls it for CPU inference; under autograd or `torch.compile` a layer appends by
`torch.cat` as before, and a layer that beam search or cropping replaced by other tensors
starts a new buffer from them.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

CHUNK = 256  # tokens of room added when a buffer is full (a multiple of this, at least the new tokens)


class GrowingLayer(DynamicLayer):
    """`DynamicLayer` whose keys and values are views of larger buffers (see the module docstring)."""

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if (torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad)) or \
                torch.compiler.is_compiling():
            self._buffers = None  # the stock concatenation, which autograd and the compiler know
            return super().update(key_states, value_states, *args, **kwargs)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        needed = length + key_states.shape[-2]
        if not self._owns_views() or needed > self._buffers[0].shape[-2]:
            self._grow(key_states, value_states, length, needed)
        keys, values = self._buffers
        keys.narrow(-2, length, key_states.shape[-2]).copy_(key_states)
        values.narrow(-2, length, value_states.shape[-2]).copy_(value_states)
        self.keys, self.values = keys.narrow(-2, 0, needed), values.narrow(-2, 0, needed)
        return self.keys, self.values

    def _owns_views(self) -> bool:
        """`keys`/`values` are still the start of the buffers (not tensors that `reorder_cache`,
        `batch_select_indices` or `reset` put in their place; a `crop` keeps a shorter view)."""
        if self._buffers is None:
            return False
        return all(view.data_ptr() == buffer.data_ptr() and view.stride() == buffer.stride()
                   and view.shape[:-2] == buffer.shape[:-2]
                   for view, buffer in zip((self.keys, self.values), self._buffers))

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, needed: int) -> None:
        capacity = -(-needed // CHUNK) * CHUNK
        buffers = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
            if length:
                buffer.narrow(-2, 0, length).copy_(old)
            buffers.append(buffer)
        self._buffers = (buffers[0], buffers[1])

    def reset(self) -> None:
        self._buffers = None
        super().reset()


def grow_in_place(cache) -> None:
    """Make the plain `DynamicLayer`s of `cache` (a transformers `DynamicCache`) `GrowingLayer`s."""
    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer:
            layer.__class__ = GrowingLayer
