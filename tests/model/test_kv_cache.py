"""The CPU cache layer that appends in place (`kv_cache.GrowingLayer`), against transformers' own
`DynamicLayer` (which concatenates) driven through the same operations, and in generation."""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from parscale.model import kv_cache
from parscale.model.cache_api import cache_kwargs
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import to_parscale


def _states(rows: int, new: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, new, 3, generator=gen), torch.randn(rows, 2, new, 3, generator=gen)


def _grown() -> DynamicLayer:
    layer = DynamicLayer()
    layer.__class__ = kv_cache.GrowingLayer
    return layer


def test_every_operation_leaves_what_the_concatenating_layer_holds(monkeypatch):
    """Prefill, steps across several buffer ends, crop, beam reordering, batch selection and
    repetition, reset: after each, the same keys, values and length as `DynamicLayer`."""
    monkeypatch.setattr(kv_cache, "MIN_ROOM", 2)  # a buffer holds 2 tokens more than it is given
    stock, grown = DynamicLayer(), _grown()
    seed = iter(range(1000))

    def update(rows: int, new: int) -> None:
        states = _states(rows, new, next(seed))
        want, got = stock.update(*states), grown.update(*states)
        for a, b in zip(want, got):
            assert torch.equal(a, b)

    def same() -> None:
        assert grown.get_seq_length() == stock.get_seq_length()
        assert torch.equal(grown.keys, stock.keys) and torch.equal(grown.values, stock.values)

    update(3, 3)
    for _ in range(6):  # 3 -> 9 tokens: two buffers replaced
        update(3, 1)
        same()
    update(3, 5)  # more new tokens than one chunk
    same()
    for layer in (stock, grown):
        layer.crop(-2)
    same()
    update(3, 1)  # writes over the cropped columns
    same()
    beams = torch.tensor([2, 0, 0])
    for layer in (stock, grown):
        layer.reorder_cache(beams)
    update(3, 1)
    same()
    for layer in (stock, grown):
        layer.batch_select_indices(torch.tensor([0, 2]))
    update(2, 2)
    same()
    for layer in (stock, grown):
        layer.batch_repeat_interleave(2)
    update(4, 1)
    same()
    for layer in (stock, grown):
        layer.reset()
    update(4, 2)
    same()


def test_beam_reordering_keeps_the_buffers_and_their_room():
    """`reorder_cache` gathers the whole buffers: keys and values equal the stock layer's
    reordered ones and are views of the new buffers, so the next step appends in place (the
    decode step's own append, `free_column`, applies again) instead of copying into new ones."""
    stock, grown = DynamicLayer(), _grown()
    states = _states(3, 5, 0)
    stock.update(*states)
    grown.update(*states)
    beams = torch.tensor([2, 0, 0])
    for layer in (stock, grown):
        layer.reorder_cache(beams)
    assert torch.equal(grown.keys, stock.keys) and torch.equal(grown.values, stock.values)
    buffer = grown._buffers[0]
    assert grown.keys.data_ptr() == buffer.data_ptr() and grown.free_column(3, *grown.keys.shape[1::2],
                                                                           grown.keys.dtype) == 5
    step = _states(3, 1, 1)
    for want, got in zip(stock.update(*step), grown.update(*step)):
        assert torch.equal(want, got)
    assert grown._buffers[0] is buffer  # appended in place


def test_appends_in_place_with_bounded_room_and_copies():
    """The point of the layer: over 600 steps the buffers are replaced a few times, not at every
    step; the tokens copied add up to a few times the final cache (concatenation copies the
    whole cache per step: 190,000 tokens here); the room held is at most a quarter of the cache
    or MIN_ROOM tokens."""
    layer = _grown()
    layer.update(*_states(2, 10, 0))
    buffers, copied = 1, 0
    for step in range(600):
        before, length = layer.keys.data_ptr(), layer.get_seq_length()
        layer.update(*_states(2, 1, step + 1))
        if layer.keys.data_ptr() != before:
            buffers, copied = buffers + 1, copied + length
        room = layer._buffers[0].shape[-2] - layer.get_seq_length()
        assert 0 <= room <= max(kv_cache.MIN_ROOM, layer.get_seq_length() // kv_cache.ROOM)
    assert layer.get_seq_length() == 610
    assert buffers <= 20 and copied <= 5 * 610


def test_under_autograd_it_concatenates():
    layer = _grown()
    key, value = (t.requires_grad_() for t in _states(1, 3, 0))
    keys, values = layer.update(key, value)
    keys2, values2 = layer.update(*(t * 2 for t in _states(1, 1, 1)))  # no gradient wanted: in place again
    (keys2.sum() + values2.sum()).backward()
    assert torch.equal(key.grad, torch.ones_like(key)) and torch.equal(value.grad, torch.ones_like(value))


@pytest.mark.parametrize("n_streams", [1, 4])
def test_generate_on_cpu_grows_in_place_with_the_stock_tokens(tiny_factory, monkeypatch, n_streams):
    """Left-padded batch of 3, past a buffer end: the cache `generate` used is the in-place one,
    and its tokens and logits equal those of the same model with the concatenating cache."""
    monkeypatch.setattr(kv_cache, "MIN_ROOM", 2)  # buffers replaced during the generation
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(n_streams, 3), seed=2).eval()
    ids = torch.randint(2, 97, (3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    runs = []
    for grows in (True, False):
        if not grows:
            monkeypatch.setattr(kv_cache, "grow_in_place", lambda cache: None)
        with torch.no_grad():
            cache = DynamicCache()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False,
                                 **cache_kwargs(model, cache), return_dict_in_generate=True, output_logits=True)
        assert all(type(layer) is (kv_cache.GrowingLayer if grows else DynamicLayer) for layer in cache.layers)
        runs.append(out)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(torch.stack(runs[0].logits), torch.stack(runs[1].logits), rtol=1e-6, atol=1e-6)
