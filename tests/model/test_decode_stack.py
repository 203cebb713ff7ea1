"""The bfloat16 decode steps of a forward's layers as one C call (`decode_stack`): the same bits
as the layers' steps one by one and as the layers' own forward, every case where the chain is
left (another input, an input changed in place, a hook, a forward stopped half-way) computed
from what the layer is actually given, and the cache as the layers' own forward leaves it."""
from __future__ import annotations

import pytest
import torch
from test_decode_layer import _padded_batch  # ids of 6 tokens, the rows after the first left-padded
from transformers import DynamicCache

from parscale.model import decode_layer, decode_stack
from parscale.model.cache_api import NEW_NAME
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import to_parscale

LAYERS = 4


@pytest.fixture(autouse=True)
def _kernels():
    libs = decode_layer._libraries(False)
    if libs is None or libs[4] is None:
        pytest.fail("the CPU decode kernels or the decode step's chain (csrc/decode_step.cpp) did not build")
    if decode_layer.exp_for_silu(libs[4]) is None:
        pytest.skip("this build has no one-call bfloat16 step (neither AVX-512 nor AVX2), so no stack")


@pytest.fixture
def stack_runs(monkeypatch):
    """The stack's single calls made (`decode_stack.run` that did not decline)."""
    runs = [0]
    real = decode_stack.run

    def counted(*args):
        out = real(*args)
        runs[0] += out is not None
        return out

    monkeypatch.setattr(decode_stack, "run", counted)
    return runs


def _model(tiny_factory, n_streams: int, layers: int = LAYERS):
    model = to_parscale(tiny_factory("qwen2", seed=3, num_hidden_layers=layers), ParScaleConfig(n_streams), seed=1)
    model = model.to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # norms whose weights differ, an aggregation that is not uniform
        for name, p in model.named_parameters():
            if "norm" in name or "aggregate" in name:
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def _generate(model, ids, mask, **kw):
    kw = dict(attention_mask=mask, do_sample=False, return_dict_in_generate=True, output_logits=True) | kw
    with torch.no_grad():
        return model.generate(ids, **kw)


def _three_ways(model, ids, mask, runs, **kw):
    """The stack (on), the layers' steps one by one (use_stack off), the layers' own forward
    (the decode step off): (outputs of each, the stack's calls)."""
    stacked = _generate(model, ids, mask, **kw)
    made = runs[0]
    decode_layer.use_stack = False
    try:
        one_by_one = _generate(model, ids, mask, **kw)
    finally:
        decode_layer.use_stack = True
    decode_layer.enable(model, False)
    own = _generate(model, ids, mask, **kw)
    decode_layer.enable(model)
    assert runs[0] == made  # neither of the others made one
    return stacked, one_by_one, own, made


def _equal(a, b) -> bool:
    return torch.equal(a.sequences, b.sequences) and torch.equal(torch.stack(a.logits), torch.stack(b.logits))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_streams", [1, 2, 4, 8])
def test_stacked_steps_equal_the_steps_one_by_one_and_the_layers_own_forward(tiny_factory, stack_runs, n_streams,
                                                                             batch):
    """Greedy tokens and every step's logits, bit for bit; the stack takes every step from the
    third decode step on (the first two record the chain)."""
    model = _model(tiny_factory, n_streams)
    ids, mask = _padded_batch(batch)
    stacked, one_by_one, own, made = _three_ways(model, ids, mask, stack_runs, max_new_tokens=8)
    assert made == (7 - 2 if n_streams * batch <= 16 else 0)  # 7 decode steps; 24 rows: the layers' forward
    assert _equal(stacked, one_by_one) and _equal(stacked, own)


def test_beams_and_steps_past_the_cache_room_keep_the_stack(tiny_factory, stack_runs):
    """Beam search gathers the cache between steps, a full buffer is replaced by a larger one:
    the stack takes the new buffers (`Stack.refresh`), bit for bit the layers' own forward."""
    from parscale.model import kv_cache

    model = _model(tiny_factory, 2)
    ids, mask = _padded_batch(1)
    new_tokens = 6 + kv_cache.MIN_ROOM + 4  # past the room the prefill's buffers have
    stacked, one_by_one, own, made = _three_ways(model, ids, mask, stack_runs, max_new_tokens=new_tokens)
    assert _equal(stacked, one_by_one) and _equal(stacked, own)
    assert made >= new_tokens - 1 - 3  # the step that grows the buffers goes one by one (`update`)
    stack_runs[0] = 0
    kw = dict(max_new_tokens=7, num_beams=3, output_scores=True, output_logits=False)
    stacked, _, own, made = _three_ways(model, ids, mask, stack_runs, **kw)
    assert made == 6 - 2
    assert torch.equal(stacked.sequences, own.sequences) and torch.equal(torch.stack(stacked.scores),
                                                                         torch.stack(own.scores))


def _on_call(monkeypatch, model, act):
    """Every call of a decoder layer of `model` goes through `act(layer index, decode step,
    hidden) -> hidden` first (in the class's `__call__`, so no hook is registered): for the
    fast class and the stock class alike."""
    step = [0]
    cls = type(model.model.layers[0])
    real = cls.__call__

    def call(self, hidden, *args, **kwargs):
        index = self.self_attn.layer_idx
        if index == 0 and hidden.shape[1] == 1:
            step[0] += 1
        return real(self, act(self, index, step[0] if hidden.shape[1] == 1 else 0, hidden), *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", call)
    return step


@pytest.mark.parametrize("change", ["other object", "changed in place", "other values", "hook"])
def test_a_layer_called_otherwise_than_its_chain_gets_its_own_step(tiny_factory, stack_runs, monkeypatch, change):
    """At the fifth decode step layer 2 is given the same values in another tensor, its input
    changed in place (to other values), other values in another tensor, or a hook is registered on it between
    the stack's call and its own: it computes its step from what it is given (the tokens and
    logits of the layers' own forward given the same), and the cache takes no stack again."""
    hooked = []

    def act(layer, index, step, hidden):
        if index != 2 or step != 5:
            return hidden
        if change == "other object":
            return hidden.clone()
        if change == "changed in place":  # other values, in the same tensor
            return hidden.mul_(1.5)
        if change == "other values":
            return hidden * 1.5
        hooked.append(layer.register_forward_hook(lambda module, args, out: out * 2))
        return hidden

    model = _model(tiny_factory, 2)
    ids, mask = _padded_batch(3)
    with monkeypatch.context() as patch:
        _on_call(patch, model, act)
        stacked = _generate(model, ids, mask, max_new_tokens=9)
    made = stack_runs[0]
    for handle in hooked:
        handle.remove()
    decode_layer.enable(model, False)
    with monkeypatch.context() as patch:
        _on_call(patch, model, act)
        own = _generate(model, ids, mask, max_new_tokens=9)
    assert _equal(stacked, own)
    assert made == 5 - 2  # steps 3, 4 and 5 (left at layer 2), none after
    assert len(hooked) == (2 if change == "hook" else 0)


def test_a_forward_stopped_half_way_leaves_the_cache_as_the_layers_own_forward(tiny_factory, stack_runs, monkeypatch):
    """A forward that stops after the stack's call, at layer 2 (an error, Ctrl-C): layers 0 and 1
    show the step's keys and values, layers 2 and 3 not, as the layers' own forward leaves
    them; the next generation starts over (the stack dropped) and is the layers' own forward."""
    class Stop(Exception):
        pass

    def act(layer, index, step, hidden):
        if index == 2 and step == 5:
            raise Stop
        return hidden

    model = _model(tiny_factory, 2)
    ids, mask = _padded_batch(1)
    caches = {}
    for path in ("stack", "own"):
        decode_layer.enable(model, path == "stack")
        caches[path] = DynamicCache()
        with monkeypatch.context() as patch, pytest.raises(Stop):
            _on_call(patch, model, act)
            _generate(model, ids, mask, max_new_tokens=9, **{NEW_NAME: caches[path]})
        if path == "stack":  # a cache of the caller's: its first decode step grows it (`update`)
            assert stack_runs[0] == 5 - 3
    lengths = [layer.keys.shape[2] for layer in caches["stack"].layers]
    assert lengths == [layer.keys.shape[2] for layer in caches["own"].layers] == [6 + 5] * 2 + [6 + 4] * 2
    for got, want in zip(caches["stack"].layers, caches["own"].layers):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    decode_layer.enable(model)
    stack_runs[0] = 0
    stacked, one_by_one, own, made = _three_ways(model, ids, mask, stack_runs, max_new_tokens=6)
    assert _equal(stacked, own) and _equal(stacked, one_by_one) and made == 5 - 2


def test_hidden_states_asked_for_are_the_layers_own(tiny_factory, stack_runs):
    model = _model(tiny_factory, 2)
    ids, mask = _padded_batch(3)
    kw = dict(max_new_tokens=6, output_hidden_states=True)
    stacked, _, own, _ = _three_ways(model, ids, mask, stack_runs, **kw)
    assert _equal(stacked, own)
    for got, want in zip(stacked.hidden_states, own.hidden_states):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_switching_the_step_off_or_quantizing_drops_the_stack(tiny_factory, stack_runs):
    model = _model(tiny_factory, 2)
    ids, mask = _padded_batch(1)
    _generate(model, ids, mask, max_new_tokens=5)
    assert stack_runs[0] == 2
    linked = [m for m in model.modules() if "_parscale_link" in m.__dict__]
    assert len(linked) == LAYERS
    decode_layer.enable(model, False)
    assert not [m for m in model.modules() if "_parscale_link" in m.__dict__]
    decode_layer.enable(model)
    _generate(model, ids, mask, max_new_tokens=5)
    model.quantize_int8()
    assert not [m for m in model.modules() if "_parscale_link" in m.__dict__]


def test_a_generation_over_leaves_no_cache_alive(tiny_factory, stack_runs):
    """The stack stays on the model's layers between generations; it must not hold the last
    cache or its buffers."""
    import gc
    import weakref

    model = _model(tiny_factory, 2)
    ids, mask = _padded_batch(1)
    cache = DynamicCache()
    _generate(model, ids, mask, max_new_tokens=7, **{NEW_NAME: cache})
    assert stack_runs[0] > 0
    refs = [weakref.ref(cache)] + [weakref.ref(t) for layer in cache.layers for t in (layer.keys, *layer._buffers)]
    del cache
    gc.collect()
    assert [ref() for ref in refs] == [None] * len(refs)


def test_two_threads_generating_with_one_model_get_their_own_tokens(tiny_factory, stack_runs):
    """Each thread's stack is its own (a server's threads may share a model): generations in two
    threads at once, each with its own cache, give each its tokens and logits alone."""
    import sys
    import threading

    model = _model(tiny_factory, 2, layers=8)
    prompts = [_padded_batch(1), (torch.randint(2, 97, (1, 6), generator=torch.Generator().manual_seed(9)),
                           torch.ones(1, 6, dtype=torch.long))]
    kw = dict(max_new_tokens=24)
    alone = [_generate(model, ids, mask, **kw) for ids, mask in prompts]
    got, errors, start = [None, None], [], threading.Barrier(2)

    def work(k: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                got[k] = _generate(model, *prompts[k], **kw)
                assert _equal(got[k], alone[k])
        except BaseException as error:  # noqa: BLE001 (reported in the main thread)
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads take turns every few bytecodes
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert stack_runs[0] > 0


def test_another_threads_call_leaves_a_stack_alone(tiny_factory, stack_runs):
    """A stack belongs to the thread that recorded it: a layer called from another thread in the
    middle of its step (emulated: the stack's state as after its first layer) takes its own step
    and neither drops the stack nor touches its step."""
    import threading

    model = _model(tiny_factory, 2)
    ids, mask = _padded_batch(1)
    _generate(model, ids, mask, max_new_tokens=6)
    assert stack_runs[0] > 0
    layer = model.model.layers[1]
    stack, index = layer.__dict__["_parscale_link"]
    stack.next, stack.outs = index, (torch.zeros(1), torch.zeros(1))  # as if layer 0 had just run it
    got = []
    thread = threading.Thread(target=lambda: got.append(decode_stack.step((stack, index), torch.zeros(2, 1, 32), {})))
    thread.start()
    thread.join()
    assert got == [None] and stack.next == index and stack.outs is not None
    assert all("_parscale_link" in m.__dict__ for m in model.model.layers)
