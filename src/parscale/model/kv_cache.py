"""A KV cache layer that appends in place on CPU instead of concatenating at every step.

transformers' default cache (`DynamicCache` of `DynamicLayer`s) appends each decode step's keys
and values with `torch.cat`, a copy of the whole cache per layer and step: O(L) bytes per token,
O(L^2) over a generation. With P streams the cache has P*B rows, so the copy grows with P and
the context: on the decode benchmark's 16-layer model at P = 8 in bfloat16 (2 threads), 56.8
against 51.7 ms per token in place with a 1024-token prompt, 44.4 against 42.3 with 64
(benchmarks/kv_cache.py). `GrowingLayer` keeps the keys and values
in buffers with room for more tokens and writes each step into the free columns; `keys`/`values`
are views of the filled part, so everything that reads a `DynamicLayer` reads it unchanged (the
decode attention kernel takes the views' strides as they are). A full buffer is replaced by one
with room for a quarter of its length more (at least `MIN_ROOM` tokens): the copies add up to a
few times the final cache, not O(L^2), and the room held is at most a quarter of the cache
(`parscale cost measure` reports it as `kv_room_bytes`).

The decode step of a Llama-family layer (`decode_layer`) writes a step's rotated keys and its
values into the buffers' free column itself (`free_column`, `filled`) when the cache's `update`
is the stock one.

`grow_in_place(cache)` turns the plain `DynamicLayer`s of a cache into `GrowingLayer`s (the
class of the object changes, its state stays, as `kernels.enable` does with Linear modules).
The wrapper calls it for CPU inference; under autograd or `torch.compile` a layer appends by
`torch.cat` as before, and a layer that cropping or batch selection replaced by other tensors
starts a new buffer from them; beam search's reordering gathers the buffers themselves
(`reorder_cache`), so they keep their room.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 32  # tokens of room at least, when a buffer is replaced
ROOM = 4  # ... and a 1/ROOM of the tokens it holds


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
        keys, buffers, new = self.keys, self._views(), key_states.shape[-2]
        length = keys.shape[-2] if keys.dim() == key_states.dim() else 0  # the empty start is 1-D
        if buffers is None or length + new > buffers[0].shape[-2]:
            buffers = self._grow(key_states, value_states, length, length + new)
        buffers[0][..., length:length + new, :] = key_states
        buffers[1][..., length:length + new, :] = value_states
        self.keys, self.values = buffers[0][..., :length + new, :], buffers[1][..., :length + new, :]
        return self.keys, self.values

    def free_column(self, rows: int, heads: int, dim: int, dtype: torch.dtype) -> int | None:
        """Where the next token's keys and values go when the buffers have room for one more and
        `keys`/`values` are still their views of these shapes: then the decode step
        (`decode_layer`) writes that column itself and calls `filled`. Else None (`update`)."""
        buffers = self._views()
        if buffers is None:
            return None
        buffer = buffers[0]
        if (buffer.shape[0] != rows or buffer.shape[1] != heads or buffer.shape[3] != dim or buffer.dtype != dtype
                or buffers[1].shape != buffer.shape or buffers[1].dtype != dtype):
            return None
        length = self.keys.shape[2]
        return length if length < buffer.shape[2] else None

    def _views(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The buffers while `keys` is still their view; else None. It is no longer once
        `batch_select_indices` or `reset` put other tensors in its place (a `crop` keeps a
        shorter view of it, `reorder_cache` gathers the buffers themselves)."""
        buffers, keys = self._buffers, self.keys
        if buffers is None or keys.data_ptr() != buffers[0].data_ptr() or keys.shape[:-2] != buffers[0].shape[:-2]:
            return None
        return buffers

    def filled(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`keys` and `values` as the views of the buffers' first `length` positions (`update`'s)."""
        self.keys, self.values = self._buffers[0].narrow(2, 0, length), self._buffers[1].narrow(2, 0, length)
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, needed: int):
        capacity = needed + max(MIN_ROOM, needed // ROOM)
        buffers = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
            if length:
                buffer[..., :length, :] = old
            buffers.append(buffer)
        self._buffers = (buffers[0], buffers[1])
        return self._buffers

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search's reordering at every step, into buffers that keep their room: the stock
        one replaced `keys`/`values` by gathered copies without room, so the next step copied
        them again into new buffers and appended through `update` (never the decode step's own
        append). One gather of the whole buffers instead (their room is at most a quarter of the
        cache), and `keys`/`values` their views again."""
        buffers, keys = self._views(), self.keys
        if (buffers is None or torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and (keys.requires_grad or self.values.requires_grad))):
            self._buffers = None
            return super().reorder_cache(beam_idx)
        length = keys.shape[-2]
        if length == 0:
            return
        index = beam_idx.to(buffers[0].device)
        self._buffers = (buffers[0].index_select(0, index), buffers[1].index_select(0, index))
        self.filled(length)

    def reset(self) -> None:
        self._buffers = None
        super().reset()


def grow_in_place(cache) -> None:
    """Make the plain `DynamicLayer`s of `cache` (a transformers `DynamicCache`) `GrowingLayer`s."""
    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer:
            layer.__class__ = GrowingLayer
