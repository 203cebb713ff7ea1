"""ParScaleForCausalLM: equivalences, cache, padding, stream order, gradients, generation."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from _isa import compiler_present
from parscale.model import kernels
from parscale.model.cache_api import output_cache
from parscale.model.config import ParScaleConfig
from parscale.errors import UserError
from parscale.model.wrapper import ParScaleForCausalLM, to_parscale

FAMILIES = ["qwen2", "llama", "mistral", "gemma"]


def _ids(batch: int, length: int, seed: int = 1, vocab: int = 97) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _wrap(tiny_factory, family="qwen2", n_streams=2, n_prefix=3, seed=0, eps=0.01):
    model = to_parscale(tiny_factory(family), ParScaleConfig(n_streams, n_prefix, eps), seed=seed)
    # Non-zero aggregation output layer, so that the weights depend on the streams in every test.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 100)
        for p in model.model.aggregate_layer[2].parameters() if n_streams > 1 else []:
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_p1_equals_base_model(tiny_factory, family, count_calls):
    """Bit for bit with the stock matmul; to float tolerance with the decode kernel, which sums
    each dot product in another order than F.linear (16 rows here: the kernel's range)."""
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding too
    with torch.no_grad():
        base_logits = tiny_factory(family)(ids, attention_mask=mask).logits
        model = to_parscale(tiny_factory(family), ParScaleConfig(n_streams=1)).eval()
        assert not list(model.stream_parameters())
        calls = count_calls(kernels, "skinny_linear")
        fast = model(ids, attention_mask=mask).logits
        model.use_fast_kernels(False)
        stock = model(ids, attention_mask=mask).logits
    assert torch.equal(stock, base_logits)
    assert calls[0] > 0 or not compiler_present()
    torch.testing.assert_close(fast, base_logits, rtol=1e-5, atol=1e-6)  # float32 rounding order only


@pytest.mark.parametrize("family", FAMILIES)
def test_p4_forward_shapes_and_stream_keys(tiny_factory, family):
    model = _wrap(tiny_factory, family, n_streams=4)
    out = model(_ids(3, 5), labels=_ids(3, 5))
    assert out.logits.shape == (3, 5, 97) and torch.isfinite(out.loss)
    names = [n for n, _ in model.stream_parameters()]
    assert "model.layers.1.self_attn.prefix_k" in names and "model.aggregate_layer.2.bias" in names
    assert model.model.layers[0].self_attn.prefix_v.shape == (4, 2, 3, 8)  # P kv T d


@pytest.mark.parametrize("family,n_streams", [("qwen2", 1), ("qwen2", 2), ("qwen2", 4), ("llama", 2), ("mistral", 4), ("gemma", 2)])
def test_cached_decoding_equals_uncached_forward(tiny_factory, family, n_streams):
    model = _wrap(tiny_factory, family, n_streams=n_streams)
    ids = _ids(2, 10)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4], use_cache=True)
        steps = [out.logits]
        cache = output_cache(out)
        for t in range(4, 10):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = output_cache(out)
            steps.append(out.logits)
    assert cache.get_seq_length() == 10  # the cache holds real tokens only
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_sliding_window_cached_decoding_equals_uncached(tiny_factory):
    """A window shorter than the sequence: the cache trims real tokens, the prefix stays."""
    model = to_parscale(tiny_factory("mistral", sliding_window=3), ParScaleConfig(2, 3)).eval()
    ids = _ids(2, 9)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, 9):
            out = model(ids[:, t : t + 1], past_key_values=output_cache(out), use_cache=True)  # the old name too
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_sliding_window_limits_the_real_keys_and_never_the_prefix(tiny_factory):
    """One layer, window 3: position t attends to real tokens t-2..t and the whole prefix.
    So logits from position 3 on ignore token 0, and the last position equals the model run
    on the last three tokens alone (at their positions), while the prefix still moves it."""
    model = to_parscale(tiny_factory("mistral", sliding_window=3, num_hidden_layers=1), ParScaleConfig(2, 3)).eval()
    ids = _ids(2, 9)
    other = ids.clone()
    other[:, 0] = (ids[:, 0] + 1) % 97
    with torch.no_grad():
        full, changed = model(ids).logits, model(other).logits
        tail = model(ids[:, 6:], position_ids=torch.arange(6, 9)[None].expand(2, -1)).logits
        assert (full[:, :3] - changed[:, :3]).abs().max() > 1e-4  # inside the window token 0 counts
        torch.testing.assert_close(full[:, 3:], changed[:, 3:])  # beyond it, it does not
        torch.testing.assert_close(full[:, -1], tail[:, -1])
        model.model.layers[0].self_attn.prefix_v.add_(1.0)
        assert (model(ids).logits[:, -1] - full[:, -1]).abs().max() > 1e-3  # the prefix is seen beyond the window


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(tiny_factory, side):
    model = _wrap(tiny_factory, "qwen2", n_streams=2)
    lengths = [7, 4, 2]
    samples = [_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(samples):
        cols = slice(width - len(sample), width) if side == "left" else slice(0, len(sample))
        ids[row, cols], mask[row, cols] = sample, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate passes for left padding
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=positions).logits
        for row, sample in enumerate(samples):
            alone = model(sample[None]).logits[0]
            torch.testing.assert_close(batched[row][mask[row].bool()], alone)


@pytest.mark.parametrize("n_streams", [1, 2, 4])
def test_a_cached_loop_with_left_padding_and_no_positions_equals_the_full_forward(tiny_factory, n_streams):
    """A hand-written decoding loop passes the growing 2D mask and no position_ids: every cached
    step counts real tokens as the first call does, so the padded row is not shifted by its pads."""
    model = _wrap(tiny_factory, "qwen2", n_streams=n_streams)
    ids = _ids(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate passes
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
        alone = model(ids[1:, 3:]).logits  # the padded row's tokens without their pads
        out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 9):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=output_cache(out), use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(full[1, 3:], alone[0])
    torch.testing.assert_close(torch.cat(steps, dim=1)[:, 3:], full[:, 3:])  # the pads' own logits are moot


def test_a_cached_call_needs_a_mask_over_the_cached_and_the_new_tokens(tiny_factory):
    model = _wrap(tiny_factory, "qwen2", n_streams=2)
    ids = _ids(2, 5)
    with torch.no_grad():
        cache = output_cache(model(ids[:, :4], use_cache=True))
        with pytest.raises(UserError, match="cache holds 4 tokens and 1 are new; pass a mask over"):
            model(ids[:, 4:], attention_mask=torch.ones(2, 1, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("n_streams", [1, 2, 4])
def test_a_one_row_mask_is_broadcast_over_the_batch_at_every_P(tiny_factory, n_streams):
    """A [1, L] padding mask for B rows means the same mask for every row, at every P (the
    base model itself accepts it only when it is all ones, where its mask builder skips it)."""
    model = _wrap(tiny_factory, "llama", n_streams=n_streams)
    ids = _ids(3, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])  # the same left padding for every row
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        one_row = model(ids, attention_mask=mask, position_ids=positions).logits
        per_row = model(ids, attention_mask=mask.expand(3, -1), position_ids=positions.expand(3, -1)).logits
        unmasked = model(ids, position_ids=positions).logits
    torch.testing.assert_close(one_row, per_row)
    assert (one_row[:, 2:] - unmasked[:, 2:]).abs().max() > 1e-4  # the mask did act
    ones = torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=ones).logits, model(ids).logits)
        if n_streams == 1:  # what the base model accepts, it gives the same answer for
            torch.testing.assert_close(model(ids, attention_mask=ones).logits,
                                       tiny_factory("llama")(ids, attention_mask=ones).logits)


def test_changing_one_stream_prefix_changes_output(tiny_factory):
    model = _wrap(tiny_factory, "qwen2", n_streams=2)
    ids = _ids(2, 6)
    with torch.no_grad():
        before = model(ids).logits
        model.model.layers[1].self_attn.prefix_k[1] += 0.5
        after = model(ids).logits
    assert (after - before).abs().max() > 1e-4


def test_permuting_streams_with_their_parameters_leaves_output_unchanged(tiny_factory):
    """Stream n's feature in the MLP input is h*P + n (interleaved): permute accordingly."""
    n_streams, hidden = 3, 32
    model = _wrap(tiny_factory, "qwen2", n_streams=n_streams)
    ids = _ids(2, 6)
    perm = torch.tensor([2, 0, 1])  # new stream j is old stream perm[j]
    with torch.no_grad():
        before = model(ids).logits
        for attention in model.attention_modules():
            attention.prefix_k.copy_(attention.prefix_k[perm])
            attention.prefix_v.copy_(attention.prefix_v[perm])
        head = model.model.aggregate_layer
        cols = (torch.arange(hidden)[:, None] * n_streams + perm[None, :]).reshape(-1)  # h*P + perm[j]
        head[0].weight.copy_(head[0].weight[:, cols])
        head[2].weight.copy_(head[2].weight[perm])
        head[2].bias.copy_(head[2].bias[perm])
        after = model(ids).logits
        # The same permutation applied as if streams were concatenated must change the output.
        wrong = (perm[:, None] * hidden + torch.arange(hidden)[None, :]).reshape(-1)
        head[0].weight.copy_(head[0].weight[:, wrong])
        broken = model(ids).logits
    torch.testing.assert_close(after, before)
    assert (broken - before).abs().max() > 1e-4


def test_gradients_reach_prefixes_and_aggregation(tiny_factory):
    model = _wrap(tiny_factory, "llama", n_streams=2).train()
    model.freeze_backbone()
    ids = _ids(2, 6)
    model(ids, labels=ids).loss.backward()
    grads = dict(model.stream_parameters())
    assert len(grads) == 2 * 2 + 4
    for name, param in grads.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in grads)


def test_init_is_seeded_and_uniform_at_start(tiny_factory):
    base = tiny_factory("qwen2")
    rng = torch.get_rng_state()
    a = to_parscale(base, ParScaleConfig(2, 4), seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    b = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 4), seed=3)
    c = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 4), seed=4)
    pa, pb, pc = (m.model.layers[0].self_attn.prefix_k for m in (a, b, c))
    torch.testing.assert_close(pa, pb)
    assert not torch.equal(pa, pc) and not torch.equal(pa[0], pa[1])
    assert 0.01 < pa.std().item() < 0.03  # N(0, 0.02)
    weights = a.model.aggregate_layer.stream_weights(torch.randn(4, 3, 32))
    torch.testing.assert_close(weights, torch.full_like(weights, 0.5))


def test_a_number_of_streams_stands_for_the_default_config(tiny_factory):
    ids = torch.randint(2, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    short = to_parscale(tiny_factory("qwen2"), 4, seed=3).eval()
    full = to_parscale(tiny_factory("qwen2"), ParScaleConfig(n_streams=4), seed=3).eval()
    assert short.parscale_config == full.parscale_config
    with torch.no_grad():
        assert torch.equal(short(ids).logits, full(ids).logits)
    for wrong in ({"n_streams": 4}, True, "4"):
        with pytest.raises(UserError, match="ParScaleConfig or a number of streams.*ParScaleConfig\\(n_streams=4\\) or 4"):
            to_parscale(tiny_factory("qwen2"), wrong)


def test_new_stream_parameters_have_the_documented_scale(tiny_factory):
    """Prefixes N(0, 0.02) drawn from Generator(seed) (12,288 draws: the sample std is within
    +-0.0005 of 0.02 at 4 standard errors), the first aggregation layer U(+-1/sqrt(P*H)),
    the last zero. Checked against numbers, not against another call of to_parscale."""
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(4, 48), seed=5)
    prefixes = torch.cat([p.detach().reshape(-1) for a in model.attention_modules() for p in (a.prefix_k, a.prefix_v)])
    assert prefixes.numel() == 2 * 2 * 4 * 2 * 48 * 8
    assert abs(prefixes.std().item() - 0.02) < 5e-4 and abs(prefixes.mean().item()) < 5e-4
    gen = torch.Generator().manual_seed(5)  # the documented draw order: layer by layer, keys then values
    expected = torch.cat([torch.randn(4, 2, 48, 8, generator=gen).reshape(-1) for _ in range(4)]) * 0.02
    torch.testing.assert_close(prefixes, expected)
    head = model.model.aggregate_layer
    bound = 1 / math.sqrt(4 * 32)
    assert head[0].weight.abs().max() <= bound and head[0].weight.abs().max() > 0.95 * bound
    assert head[0].weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # the std of U(-b, b)
    assert not head[0].bias.any() and not head[2].weight.any() and not head[2].bias.any()


def test_labels_loss_equals_an_independent_cross_entropy(tiny_factory):
    """The `labels=` loss: next-token cross-entropy in float64 by hand, -100 ignored."""
    model = _wrap(tiny_factory, "llama", n_streams=3)
    ids = _ids(2, 7)
    labels = ids.clone()
    labels[0, :3] = -100  # e.g. a prompt that is not trained on
    with torch.no_grad():
        out = model(ids, labels=labels)
    logp = torch.log_softmax(out.logits.double(), dim=-1)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(6):  # position t predicts token t + 1
            if labels[b, t + 1] != -100:
                total -= logp[b, t, labels[b, t + 1]].item()
                count += 1
    assert count == 10
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)


def test_greedy_generate_equals_argmax_loop(tiny_factory):
    model = _wrap(tiny_factory, "qwen2", n_streams=4)
    ids = _ids(2, 5)
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=6, do_sample=False)
        seq = ids
        for _ in range(6):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq)


def test_static_cache_generate_equals_dynamic(tiny_factory):
    model = _wrap(tiny_factory, "llama", n_streams=2)
    ids = _ids(2, 4)
    with torch.no_grad():
        dynamic = model.generate(ids, max_new_tokens=5, do_sample=False)
        static = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_left_padded_generate_equals_each_prompt_alone(tiny_factory):
    model = _wrap(tiny_factory, "mistral", n_streams=2)
    short, long = _ids(1, 3, seed=5), _ids(1, 6, seed=6)
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = (torch.arange(6)[None] >= torch.tensor([[3], [0]])).long()
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        alone = [model.generate(p, max_new_tokens=5, do_sample=False) for p in (short, long)]
    assert torch.equal(batched[0, 3:], alone[0][0]) and torch.equal(batched[1], alone[1][0])


def test_beam_search_scores_match_rescoring(tiny_factory):
    model = _wrap(tiny_factory, "qwen2", n_streams=2)
    ids = _ids(1, 4)
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False,
            length_penalty=0.0, return_dict_in_generate=True, output_scores=True,
        )
        logprobs = torch.log_softmax(model(out.sequences).logits.double(), dim=-1)  # uncached
    new = out.sequences[:, 4:]
    rescored = logprobs[:, 3:-1].gather(-1, new[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(out.sequences_scores.double(), rescored, rtol=1e-4, atol=1e-4)
    assert len({tuple(s.tolist()) for s in out.sequences}) == 3


def test_sampling_runs_and_is_seeded(tiny_factory):
    model = _wrap(tiny_factory, "qwen2", n_streams=2)
    ids = _ids(2, 3)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(ids, max_new_tokens=4, do_sample=True, temperature=0.8, top_p=0.9))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (2, 7)


def test_unsupported_models_fail_clearly(tiny_factory):
    with pytest.raises(UserError, match="already a ParScale"):
        to_parscale(to_parscale(tiny_factory("qwen2"), ParScaleConfig(1)), ParScaleConfig(2))
    with pytest.raises(UserError, match="not a transformers causal LM"):
        to_parscale(torch.nn.Linear(2, 2), ParScaleConfig(2))
    flash = tiny_factory("llama")
    flash.config._attn_implementation_internal = "flash_attention_2"
    if importlib.util.find_spec("flash_attn") is None:  # where it is installed, flash_attention_2 is honoured
        with pytest.raises(UserError, match="flash_attention_2.*flash-attn package"):
            to_parscale(flash, ParScaleConfig(2))
    flex = tiny_factory("llama")
    flex.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(UserError, match="LlamaForCausalLM.*flex_attention.*cannot carry the stream prefixes"):
        to_parscale(flex, ParScaleConfig(2))
    from transformers import AutoModelForCausalLM, Gemma2Config

    gemma2 = AutoModelForCausalLM.from_config(Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(UserError, match="Gemma2ForCausalLM.*soft-capping"):
        to_parscale(gemma2, ParScaleConfig(2))
    with pytest.raises(UserError, match="ParScaleConfig"):
        to_parscale(tiny_factory("qwen2"), {"n_streams": 2})


def test_switching_attention_away_is_refused(tiny_factory):
    model = _wrap(tiny_factory, "llama", n_streams=2)
    model.set_attn_implementation("eager")
    with pytest.raises(UserError, match="would ignore the stream prefixes"):
        model(_ids(1, 3))


def test_print_trainable_parameters(tiny_factory, capsys):
    model = _wrap(tiny_factory, "qwen2", n_streams=2)
    model.freeze_backbone()
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    n_stream = sum(p.numel() for _, p in model.stream_parameters())
    total = sum(p.numel() for p in model.parameters())
    assert line == f"trainable params: {n_stream:,d} || all params: {total:,d} || trainable%: {100 * n_stream / total:.4f}"
    assert isinstance(model, ParScaleForCausalLM) and model.config.vocab_size == 97


def test_activation_checkpointing_gives_the_same_gradients(tiny_factory):
    model = _wrap(tiny_factory, "qwen2", n_streams=2).train()
    ids = _ids(2, 6)
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.stream_parameters()}
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None)  # its name since transformers renamed it
    (enable or model.gradient_checkpointing_enable)()
    model(ids, labels=ids, use_cache=False).loss.backward()
    for name, param in model.stream_parameters():
        torch.testing.assert_close(param.grad, plain[name])


def test_aggregation_functions_match_einops_and_a_loop():
    from einops import rearrange

    from parscale.model.aggregation import interleave_streams, smooth_weights, weighted_sum

    hidden = torch.randn(3 * 2, 4, 5, dtype=torch.float64)  # (n b) s h with P=3, B=2
    torch.testing.assert_close(interleave_streams(hidden, 3), rearrange(hidden, "(n b) s h -> b s (h n)", n=3))
    weights = torch.softmax(torch.randn(2, 4, 3, dtype=torch.float64), -1)
    smoothed = smooth_weights(weights, 0.1)
    torch.testing.assert_close(smoothed.sum(-1), torch.ones(2, 4, dtype=torch.float64))
    assert smoothed.min() >= 0.1 / 3
    for w, s in zip(weights.reshape(-1).tolist(), smoothed.reshape(-1).tolist()):  # the formula, by hand
        assert s == pytest.approx(0.9 * w + 0.1 / 3, rel=1e-12)
    one_hot = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # a stream with weight 0 keeps 0.1/4
    torch.testing.assert_close(smooth_weights(one_hot, 0.1), torch.tensor([[0.925, 0.025, 0.025, 0.025]], dtype=torch.float64))
    expected = torch.zeros(2, 4, 5, dtype=torch.float64)
    for b in range(2):
        for n in range(3):
            expected[b] += smoothed[b, :, n, None] * hidden[n * 2 + b]
    torch.testing.assert_close(weighted_sum(hidden, smoothed), expected)


def test_a_p1_models_backbone_wraps_again(tiny_factory):
    """P = 1 sets its backbone's attention to `parscale_plain_sdpa`; that backbone (sharing its
    config) wrapped with streams takes the prefix attention (the demo builds P > 1 from P = 1)."""
    base = tiny_factory("qwen2")
    p1 = to_parscale(base, ParScaleConfig(1))
    assert base.config._attn_implementation == "parscale_plain_sdpa"
    p2 = to_parscale(base, ParScaleConfig(2, 3), seed=0)
    assert p2.config._attn_implementation == "parscale_sdpa"
    with torch.no_grad():
        assert p2(_ids(1, 4)).logits.shape == (1, 4, 97)
    assert p1.parscale_config.n_streams == 1


def test_a_whole_model_saved_with_torch_save_loads_in_a_new_process(tiny_factory, tmp_path):
    """`torch.save(model)` pickles the model: a new process must find its classes (the norm
    kernel's swapped class included) and its attention names before any model was wrapped there."""
    import subprocess
    import sys

    ids = torch.randint(2, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    for n_streams in (1, 2):
        model = to_parscale(tiny_factory("qwen2"), n_streams, seed=1).eval()
        torch.save(model, tmp_path / f"p{n_streams}.pt")
        with torch.no_grad():
            torch.save(model(ids).logits, tmp_path / f"p{n_streams}-logits.pt")
    script = (
        "import sys, torch\n"
        "ids = torch.randint(2, 97, (1, 5), generator=torch.Generator().manual_seed(0))\n"
        "for p in (1, 2):\n"
        "    model = torch.load(f'{sys.argv[1]}/p{p}.pt', weights_only=False)\n"
        "    with torch.no_grad():\n"
        "        assert torch.equal(model(ids).logits, torch.load(f'{sys.argv[1]}/p{p}-logits.pt')), p\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
