"""The RMSNorm kernel (`norms`): against float64 and transformers' own forward, which norms it
takes, and where the stock forward must run instead."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from _isa import ISA_FLAGS, build_or_skip, require_kernel
from parscale.model import decode_layer, norms
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import to_parscale


@pytest.fixture(scope="module", params=list(ISA_FLAGS))
def lib(request):
    return build_or_skip(norms.library, request.param, "RMSNorm kernel")


def _norm(hidden: int, dtype: torch.dtype, seed: int = 0, cls=Qwen2RMSNorm) -> nn.Module:
    norm = cls(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(seed)))
    return norm.to(dtype)


def _reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's formula in float64, with its rounding to the input dtype before the weight."""
    x64 = x.double()
    normed = (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).double()
    return weight.double() * normed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize("hidden", [1024, 40, 13])  # vector blocks of 32, one of 8, the scalar tail only
def test_kernel_matches_float64_and_the_stock_forward(lib, dtype, rows, hidden):
    norm = _norm(hidden, dtype)
    x = (torch.randn(rows, 1, hidden, generator=torch.Generator().manual_seed(rows)) * 3).to(dtype)
    got = norms.rms_norm(x, norm.weight, norm.variance_epsilon, lib)
    stock = norm(x)  # transformers' forward (the module was not enabled)
    assert got.dtype == dtype and got.shape == x.shape
    ref = _reference(x, norm.weight, norm.variance_epsilon)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(got, stock, rtol=2e-6, atol=2e-6)
    else:  # two roundings to bfloat16 (a step is at most 2^-7 relative): the first may land one step
        # off the float64 value's rounding, the second adds half a step
        assert ((got.double() - ref).abs() <= ref.abs() * 1.5 * 2**-7).all()
        assert ((got.double() - stock.double()).abs() <= stock.double().abs() * 1.5 * 2**-7).all()
        assert (got == stock).float().mean() > 0.99  # only a sum's last bit may flip a rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nan_or_an_infinity_spoils_its_row_only(lib, dtype):
    norm = _norm(40, dtype)
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[0, 5], x[2, 39] = float("nan"), float("inf")
    got = norms.rms_norm(x, norm.weight, norm.variance_epsilon, lib)
    # a NaN spreads over its row; an infinity makes the others x * 0 and itself inf * 0 = NaN
    assert got[0].isnan().all() and got[2, :39].eq(0).all() and got[2, 39].isnan()
    torch.testing.assert_close(got[::2], norm(x)[::2], equal_nan=True)
    torch.testing.assert_close(got[1].double(), _reference(x[1:2], norm.weight, 1e-5)[0], rtol=2**-7, atol=1e-6)


def test_only_llama_family_norms_are_recognised():
    class Renamed(nn.Module):  # the name and the attributes, another formula
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * self.weight

    assert norms.is_llama_rms_norm(Qwen2RMSNorm(8)) and norms.is_llama_rms_norm(LlamaRMSNorm(8))
    assert not norms.is_llama_rms_norm(GemmaRMSNorm(8))  # (1 + weight), in float32
    assert not norms.is_llama_rms_norm(Renamed())
    net = nn.ModuleDict({"a": Qwen2RMSNorm(8), "b": GemmaRMSNorm(8), "c": Renamed()})
    keys = list(net.state_dict())
    assert norms.enable(net) == 1
    assert isinstance(net["a"], Qwen2RMSNorm) and type(net["a"]) is not Qwen2RMSNorm
    assert type(net["b"]) is GemmaRMSNorm and type(net["c"]) is Renamed
    assert list(net.state_dict()) == keys and norms.enable(net) == 1  # again: still one, the same class
    assert norms.enable(net, False) == 1 and type(net["a"]) is Qwen2RMSNorm


class _Subclass(torch.Tensor):
    pass


def test_stock_forward_where_the_kernel_does_not_apply(count_calls):
    require_kernel(norms.library(), "norm kernel")
    calls = count_calls(norms, "rms_norm")
    norm = _norm(32, torch.float32)
    norms.enable(norm)
    x = torch.randn(2, 32)
    with torch.no_grad():
        norm(x)
        assert calls[0] == 1
        norm(torch.randn(norms.MAX_VALUES // 32 + 1, 32))  # more values than MAX_VALUES (a long prefill)
        norm(x.bfloat16())  # float32 weight, bfloat16 input: torch promotes, the kernel does not
        norm(x.as_subclass(_Subclass))  # a tensor subclass (a DTensor's shard is not its whole value)
        norm.use_kernel = False
        norm(x)
        norm.use_kernel = True
    x.requires_grad_(True)
    norm(x).sum().backward()  # autograd
    assert calls[0] == 1 and x.grad is not None


def test_the_model_decodes_through_it_and_its_switch_restores_the_stock_norm(tiny_factory, count_calls, count_steps):
    require_kernel(norms.library(), "norm kernel")
    calls = count_calls(norms, "rms_norm")
    chained = count_steps("_chained")  # a decode step's two norms, called from C
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 3), seed=0).eval()
    ids = torch.randint(2, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
        used = calls[0] + 2 * chained[0]
        model.use_fast_kernels(False)
        stock = model.generate(ids, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    # the prefill and 4 decode steps, each two norms per layer and the final one
    assert used == 5 * (2 * 2 + 1)
    assert calls[0] + 2 * chained[0] == used and not any(type(m).__module__ == norms.__name__ for m in model.modules())
    assert torch.equal(fast.sequences, stock.sequences)
    for a, b in zip(fast.scores, stock.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_qwen3_per_head_norms_take_it_too(count_calls):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    require_kernel(norms.library(), "norm kernel")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = to_parscale(Qwen3ForCausalLM(config).eval(), 2).eval()
    calls = count_calls(norms, "rms_norm")
    ids = torch.randint(2, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        fast = model.generate(ids, **kwargs)
        used = calls[0]
        model.use_fast_kernels(False)
        stock = model.generate(ids, **kwargs)
    assert used == 5 * (2 * 4 + 1)  # per layer: input, q, k and post-attention norms; the final one
    assert torch.equal(fast.sequences, stock.sequences)
    for a, b in zip(fast.scores, stock.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_model_with_the_kernel_pickles_and_copies(tiny_factory):
    """torch.save(model) and deepcopy worked before the class swap and still do: pickle names the
    swapped class, and the norms module rebuilds it from that name."""
    import copy
    import io

    model = to_parscale(tiny_factory("qwen2"), 2).eval()
    fast = type(model.model.norm)
    assert fast.__module__ == norms.__name__ and "Qwen2RMSNorm(" in repr(model)  # prints as before
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ids = torch.randint(2, 97, (1, 4), generator=torch.Generator().manual_seed(0))
    for other in (loaded, copy.deepcopy(model)):
        assert type(other.model.norm) is fast
        with torch.no_grad():
            assert torch.equal(other(ids).logits, model(ids).logits)
    assert norms.__getattr__(fast.__qualname__) is fast  # the lookup pickle makes in a new process
    with pytest.raises(AttributeError):
        norms.__getattr__("Fast_no_dsuch_cClass")
