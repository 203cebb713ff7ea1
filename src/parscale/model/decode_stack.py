"""The bfloat16 decode steps of a forward's decoder layers as one C call.

With each layer's step one C call (`decode_layer`), what is left of a layer in Python is the
way to that call: `__call__`, the checks, the cache's free column, the ctypes call: 10.5 us a
layer with everything in the CPU caches, 26-30 us on the decode benchmark's model, whose 22 MB
of weights per layer pass through the caches between two calls (0.42-0.49 ms of a 7 ms bfloat16
step at P = 1 on a 2-core EPYC, 16 layers). Here one C call makes all the layers' steps
(`csrc/decode_step.cpp`'s `parscale_stack_bf16`: the same one-call steps, in order) and a layer
costs about 10 us of Python: 2% off a bfloat16 or int8 step (benchmarks/README.md).

How, without changing the model's forward: a model's forward calls its decoder layers one after
the other, each on the last one's output, with the same cache, mask and rotary embedding. While
the layers take their one-call step one by one, `record` notes the layers that formed such a
chain. From then on the chain's first layer runs all of the chain's steps in one call (`run`)
and keeps each layer's output; each later layer returns its own (`take`) when it is called as
the chain says: on the previous layer's output, unchanged, with the same cache, mask and
embeddings, no hook registered anywhere and no autograd since. Each layer's keys and values are
written into its cache layer's free column by the one call, and its cache layer shows them
(`GrowingLayer.filled`) only when the layer takes its output. Anything else (a layer called by
hand, another input) drops the rest: that layer and the ones after run their own step (the
dropped steps' keys and values lie past the cache's filled length, where nothing reads them,
and are written again), and the cache takes no more single calls.

Before running, `run` checks for every layer what `decode_layer.decode_step` checks for one
(its plan, the cache layer, a free column, the same column in every layer); where anything
differs the layers take their steps one by one, which records the chain again.

A stack belongs to the thread that recorded it (chains are recorded per thread): a model shared
by threads gives each its own stack in turn, and a layer called from another thread takes its
own step, which touches nothing a stack holds.
"""
from __future__ import annotations

import ctypes
import threading
import weakref

import torch
from torch.utils.hooks import RemovableHandle

from parscale.model import kernels, norms, prefix_attention
from parscale.model.cache_api import NEW_NAME, OLD_NAME
from parscale.model.kv_cache import GrowingLayer

_MAX_ROWS, _MAX_VALUES = kernels.MAX_ROWS, norms.MAX_VALUES

# per thread: the chain being recorded (`trace`, a `_Trace`) and the last cache on which a layer
# was not called as its chain said (`refused`, a weak reference: its steps go one by one)
_local = threading.local()


class _Trace:
    """The layers of one forward that took the one-call step one after the other (`record`)."""

    __slots__ = ("layers", "last", "cache", "mask", "embeddings", "column", "hooks")

    def __init__(self, layer, out, cache, mask, embeddings, column):
        self.layers, self.last, self.cache = [weakref.ref(layer)], out, weakref.ref(cache)
        self.mask, self.embeddings, self.column, self.hooks = mask, embeddings, column, RemovableHandle.next_id


class _Link:
    """One layer of a stack: its plan, and its cache layer with the view of the buffers the
    stack left (`keys`) and the free column while that is still its view. The cache layer and
    the view are weak references: a model's stack must not keep its last cache alive."""

    __slots__ = ("layer", "plan", "index", "cache_layer", "keys", "column", "capacity")

    def __init__(self, layer, plan):
        self.layer, self.plan, self.index = layer, plan, plan.layout.index
        self.cache_layer = self.keys = _dead
        self.column = self.capacity = 0

    def filled(self, length: int) -> None:
        self.keys, self.column = weakref.ref(self.cache_layer().filled(length)[0]), length


def _dead():  # a weak reference that never held anything
    return None


class Stack:
    """The layers of a recorded chain and the arguments of their one call that change only
    when a cache layer's buffers do."""

    def __init__(self, layers: list, cache):
        n = len(layers)
        self.links = [_Link(layer, layer.__dict__["_parscale_plan"]) for layer in layers]
        chains = [link.plan.layout.chain for link in self.links]
        self.pointers = (ctypes.c_void_p * n)(*(chain.address for chain in chains))
        self.kbufs, self.vbufs = (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)()
        self.row_strides, self.head_strides = (ctypes.c_int64 * n)(), (ctypes.c_int64 * n)()
        self.lib, self.head_dim, self.hidden = self.links[0].plan.layout.libs[4], chains[0].head_dim, chains[0].layer.hidden
        self.cache, self.hooks, self.training = weakref.ref(cache), RemovableHandle.next_id, layers[0].training
        self.thread = threading.get_ident()  # the one thread that uses it: its arrays and this step's state are shared
        self.column = 0  # the column of this step's keys and values
        self.next = 0  # the layer whose output waits to be taken (0: none)
        self.outs = self.mask = self.embeddings = self.version = None  # this step's (while `next`)

    def refresh(self, i: int, cache_layer, rows: int) -> int | None:
        """The free column of a cache layer whose buffers or view changed since the stack's last
        step (a reorder, a crop, a grown buffer, steps taken one by one), its buffers' pointers
        taken again; None if it has none."""
        link = self.links[i]
        chain = link.plan.layout.chain
        column = cache_layer.free_column(rows, chain.kv, chain.head_dim, torch.bfloat16)
        if column is not None:
            keys, values = cache_layer._buffers
            self.kbufs[i], self.vbufs[i] = keys.data_ptr(), values.data_ptr()
            self.row_strides[i], self.head_strides[i] = keys.stride(0), keys.stride(1)
            link.cache_layer, link.keys = weakref.ref(cache_layer), weakref.ref(cache_layer.keys)
            link.column, link.capacity = column, keys.shape[2]
        return column


def record(layer, hidden: torch.Tensor, out: torch.Tensor, cache, mask, embeddings, column: int) -> None:
    """A layer took the one-call step (`decode_layer._chained`): add it to the chain when it was
    called on the last layer's output with the same cache, mask, embeddings and column; else a
    new chain starts here, and the one before, when it had two layers or more, becomes its
    layers' stack."""
    trace = getattr(_local, "trace", None)
    if (trace is not None and trace.last is hidden and trace.cache() is cache and trace.mask is mask
            and trace.embeddings is embeddings and trace.column == column and trace.hooks == RemovableHandle.next_id):
        trace.layers.append(weakref.ref(layer))
        trace.last = out
        return
    if trace is not None:
        _install(trace)
    _local.trace = None if _refused(cache) else _Trace(layer, out, cache, mask, embeddings, column)


def _refused(cache) -> bool:
    refused = getattr(_local, "refused", None)
    return refused is not None and refused() is cache


def _install(trace: _Trace) -> None:
    layers, cache = [ref() for ref in trace.layers], trace.cache()
    if (len(layers) < 2 or cache is None or None in layers or _refused(cache)
            or trace.hooks != RemovableHandle.next_id or len(set(map(id, layers))) != len(layers)):
        return
    for layer in layers:
        plan = layer.__dict__.get("_parscale_plan")
        if (plan is None or plan.cache() is not cache or plan.layout is None or plan.layout.chain is None
                or plan.layout.chain.whole is None):
            return
    for layer in layers:  # a stack these layers had before
        forget(layer)
    stack = Stack(layers, cache)
    for i, layer in enumerate(layers):
        layer.__dict__["_parscale_link"] = (stack, i)


def forget(module) -> None:
    """Drop a layer's stack and the chain being recorded (`decode_layer.forget`)."""
    link = module.__dict__.pop("_parscale_link", None)
    if link is not None:
        for other in link[0].links:
            other.layer.__dict__.pop("_parscale_link", None)
    _local.trace = None


def step(link: tuple, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """A layer of a stack is called (with `decode_layer.use_stack` and `use_chain` on): its output
    from the stack's one call, or None (then nothing was done and the layer takes its own step)."""
    stack, i = link
    if stack.thread != threading.get_ident():  # another thread's (the layers' own steps touch nothing shared)
        return None
    if i == 0:
        return run(stack, hidden, kwargs)
    return take(stack, i, hidden, kwargs)


def take(stack: Stack, i: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """Layer i's output from the stack's call, where it is called as the chain says (else the
    stack is dropped and None returned). All in `run` but these checks: what runs here runs
    after the call streamed every layer's weights through the caches, where each object it
    touches is a miss."""
    if stack.next != i:
        return None
    if (hidden is not stack.outs[i - 1] or hidden._version != stack.version
            or kwargs.get(NEW_NAME, kwargs.get(OLD_NAME)) is not stack.cache()
            or kwargs.get("attention_mask") is not stack.mask or kwargs.get("position_embeddings") is not stack.embeddings
            or RemovableHandle.next_id != stack.hooks or torch.is_grad_enabled()):
        _drop(stack)
        return None
    stack.links[i].filled(stack.column + 1)
    out = stack.outs[i]
    if i + 1 < len(stack.links):
        stack.next = i + 1
    else:  # the chain's end: nothing of this step kept
        stack.next = 0
        stack.outs = stack.mask = stack.embeddings = None
    return out


def _drop(stack: Stack) -> None:
    """A layer was not called as the chain says, or the last step left the chain before its
    end: no more single calls for this cache (the layers not taken show the cache as it was)."""
    _local.refused = stack.cache
    stack.next = 0
    stack.outs = stack.mask = stack.embeddings = None
    for link in stack.links:
        link.layer.__dict__.pop("_parscale_link", None)


def run(stack: Stack, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """The first layer of a stack is called: every layer's step in one C call, where each
    would take the one-call step (`decode_layer.decode_step`'s checks, for all of them); the
    first layer's output. Else None (nothing done)."""
    if stack.next != 0:  # the last step left the chain before its end
        _drop(stack)
        return None
    cache = kwargs.get(NEW_NAME, kwargs.get(OLD_NAME))
    embeddings = kwargs.get("position_embeddings")
    if (cache is None or stack.cache() is not cache or RemovableHandle.next_id != stack.hooks or embeddings is None
            or torch.is_grad_enabled() or not kernels.cpu_inference(hidden) or hidden.dtype != torch.bfloat16
            or hidden.dim() != 3 or hidden.shape[1] != 1 or hidden.shape[2] != stack.hidden
            or not hidden.is_contiguous() or hidden.shape[0] > _MAX_ROWS or hidden.numel() > _MAX_VALUES
            or not prefix_attention.use_kernel):
        return None
    rows, head_dim = hidden.shape[0], stack.head_dim
    cos, sin = embeddings
    if not prefix_attention.rotary_fits(cos, sin, torch.bfloat16, head_dim, rows):
        return None
    layers, column, training = cache.layers, None, stack.training
    for i, link in enumerate(stack.links):
        layer = link.layer
        if (layer.__dict__.get("_parscale_plan") is not link.plan or layer.training != training
                or not layer.use_kernel or layer._compiled_call_impl is not None):
            return None
        cache_layer = layers[link.index]
        if cache_layer is link.cache_layer() and cache_layer.keys is link.keys() and link.column < link.capacity:
            free = link.column
        elif type(cache_layer) is GrowingLayer:
            free = stack.refresh(i, cache_layer, rows)
        else:
            return None
        if free is None or (column is not None and free != column):
            return None
        column = free
    mask = kwargs.get("attention_mask")
    additive = prefix_attention.additive_mask(mask)
    n = len(stack.links)
    outs = torch.empty((n, rows, 1, hidden.shape[2]), dtype=torch.bfloat16)
    stack.outs, stack.version = outs.unbind(0), outs._version
    stack.mask, stack.embeddings, stack.column = mask, embeddings, column
    stack.lib.parscale_stack_bf16(
        stack.pointers, n, hidden.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(), head_dim if cos.shape[0] > 1 else 0,
        stack.kbufs, stack.vbufs, stack.row_strides, stack.head_strides, column,
        *((additive.data_ptr(), additive.shape[0]) if additive is not None else (None, 0)), outs.data_ptr(),
        torch.get_num_threads())
    stack.links[0].filled(column + 1)
    stack.next = 1
    return stack.outs[0]
