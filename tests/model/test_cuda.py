"""The model on a CUDA GPU: the same tokens as the CPU in float32, bfloat16 within the error the
plain transformers model makes itself, the mask-free flash path, packed rows by a block mask,
and compiled static-cache decoding. Skipped without a GPU (`pytest -m cuda` runs them there)."""
from __future__ import annotations

import copy

import pytest
import torch

from parscale.model import prefix_attention
from parscale.model.cache_api import cache_kwargs, output_cache
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import to_parscale

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# head_dim 32 and a vocabulary of 97: big enough for the flash kernel, small enough to be quick.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def _model(tiny_factory, n_streams: int, seed: int = 0):
    model = to_parscale(tiny_factory("qwen2", **SHAPE), ParScaleConfig(n_streams, 5), seed=seed)
    with torch.no_grad():  # non-uniform aggregation, so that every stream matters
        for p in model.model.aggregate_layer[2].parameters() if n_streams > 1 else []:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7)))
    model.use_fast_kernels(False)  # the CPU side runs the stock matmul: no C++ build needed
    return model.eval()


def _batch(batch: int, length: int = 9):
    ids = torch.randint(2, 97, (batch, length), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0  # left padding, a different amount per row
    return ids, mask


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_streams", [1, 2, 4, 8])
def test_float32_cuda_gives_the_cpu_greedy_tokens(tiny_factory, n_streams, batch):
    model = _model(tiny_factory, n_streams)
    ids, mask = _batch(batch)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        cpu = model.generate(ids, attention_mask=mask, **kwargs)
        gpu_model = copy.deepcopy(model).cuda()
        gpu = gpu_model.generate(ids.cuda(), attention_mask=mask.cuda(), **kwargs)
    assert torch.equal(gpu.sequences.cpu(), cpu.sequences)
    torch.testing.assert_close(torch.stack(gpu.logits).cpu(), torch.stack(cpu.logits), rtol=1e-4, atol=1e-4)


def _error(model_fn, ids, mask):
    """Max |bfloat16 CUDA logits - float64 CPU logits| for the model `model_fn` builds, prefill and
    cached decode steps (the decode path reads the cache in bfloat16)."""
    reference = model_fn().double()
    fast = model_fn().to("cuda", torch.bfloat16)
    with torch.no_grad():
        want = reference(ids, attention_mask=mask).logits
        prefix = ids.shape[1] - 3
        out = fast(ids[:, :prefix].cuda(), attention_mask=mask[:, :prefix].cuda(), use_cache=True)
        steps = [out.logits]
        for t in range(prefix, ids.shape[1]):
            out = fast(ids[:, t : t + 1].cuda(), attention_mask=mask[:, : t + 1].cuda(),
                       position_ids=(mask[:, : t + 1].cumsum(-1) - 1)[:, -1:].cuda(), use_cache=True,
                       **cache_kwargs(fast, output_cache(out)))
            steps.append(out.logits)
    got = torch.cat(steps, dim=1).double().cpu()
    return (got - want)[mask.bool()].abs().max().item(), want.abs().max().item()


@pytest.mark.parametrize("n_streams", [2, 4, 8])
def test_bfloat16_cuda_logits_within_the_plain_models_own_bfloat16_error(tiny_factory, n_streams):
    """bfloat16's tolerance, measured rather than guessed: the plain transformers backbone in
    bfloat16 on CUDA misses its float64 logits by some amount; the P-stream model (which adds
    the prefix, the aggregation and our attention paths) may miss by at most 4x that."""
    ids, mask = _batch(3, 12)
    mask[:] = 1
    plain_err, scale = _error(lambda: tiny_factory("qwen2", **SHAPE), ids, mask)
    ours_err, _ = _error(lambda: _model(tiny_factory, n_streams), ids, mask)
    assert ours_err <= 4 * plain_err + 1e-3 * scale, (ours_err, plain_err, scale)


def test_unpadded_prefill_runs_the_flash_kernel_forward_and_backward(tiny_factory):
    """No mask for unpadded rows: restricted to the flash backend, sdpa would raise if our call
    needed a mask or a math fallback (the plain model, under the same restriction, is the control)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _model(tiny_factory, 4).cuda().train()
    ids = torch.randint(2, 97, (2, 64), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
        loss.backward()
    assert torch.isfinite(loss)
    assert model.model.layers[0].self_attn.prefix_k.grad.abs().sum() > 0


def test_packed_rows_use_a_block_mask_and_equal_each_document_alone(tiny_factory, count_calls):
    model = _model(tiny_factory, 2).cuda()
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(2, 97, (n,), generator=gen) for n in (40, 70, 18)]
    ids = torch.cat(docs)[None].cuda()
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None].cuda()
    calls = count_calls(prefix_attention.PackedMask, "block_mask")
    with torch.no_grad():
        packed = model(ids, position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([model(d[None].cuda(), use_cache=False).logits[0] for d in docs])
    assert calls[0] == 2  # two layers, one block mask
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_streams", [1, 4])
def test_compiled_static_cache_decoding_equals_eager_on_cuda(tiny_factory, n_streams):
    from parscale.model.decoding import compiled_generate_kwargs

    model = _model(tiny_factory, n_streams).cuda()
    ids, mask = _batch(2)
    kwargs = dict(attention_mask=mask.cuda(), max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(ids.cuda(), **kwargs)
        compiled = model.generate(ids.cuda(), **kwargs, **compiled_generate_kwargs("cuda"))
    assert hasattr(model, "_compiled_call")
    assert torch.equal(compiled, eager)
