"""The P = 1 control with one learnable prefix (`prefix_at_p1`): the streams' machinery, one stream."""
from __future__ import annotations

import json

import pytest
import torch

from parscale.errors import UserError
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import ParScaleForCausalLM, to_parscale


def _ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(2, 97, (batch, length), generator=torch.Generator().manual_seed(3))


def _control(tiny_factory, family="qwen2", n_prefix=3, seed=5):
    return to_parscale(tiny_factory(family), ParScaleConfig(1, n_prefix, prefix_at_p1=True), seed=seed).eval()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_equals_two_identical_streams(tiny_factory, family):
    """P = 2 whose two streams hold the control's prefix: identical streams, so any aggregation
    weights (non-zero here) give back the one stream, which is the control's computation."""
    control = _control(tiny_factory, family)
    twin = to_parscale(tiny_factory(family), ParScaleConfig(2, 3), seed=9).eval()
    with torch.no_grad():
        for mine, theirs in zip(control.attention_modules(), twin.attention_modules()):
            theirs.prefix_k.copy_(mine.prefix_k.expand_as(theirs.prefix_k))
            theirs.prefix_v.copy_(mine.prefix_v.expand_as(theirs.prefix_v))
        twin.model.aggregate_layer[2].weight.normal_(generator=torch.Generator().manual_seed(1))
    ids, mask = _ids(), torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    with torch.no_grad():
        got = control(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, twin(ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
        plain = tiny_factory(family)(ids, attention_mask=mask).logits
    assert (got - plain).abs().max() > 1e-3  # the prefix is really attended to


def test_prefix_is_the_only_addition(tiny_factory):
    model = _control(tiny_factory)
    names = [n for n, _ in model.stream_parameters()]
    assert names and all("prefix_" in n for n in names)  # no aggregation head
    assert model.model.layers[0].self_attn.prefix_k.shape == (1, 2, 3, 8)  # P kv T d
    assert model.model.layers[0].self_attn.prefix_k.abs().max() > 0  # drawn, not zero


def test_cached_decoding_equals_uncached(tiny_factory):
    model = _control(tiny_factory)
    ids = _ids(2, 9)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, 9):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_save_load_round_trip_and_the_released_p1_format(tmp_path, tiny_factory):
    model = _control(tiny_factory)
    model.save_pretrained(tmp_path / "control")
    config = json.loads((tmp_path / "control" / "config.json").read_text())
    assert config["parscale_n"] == 1 and config["parscale_prefix_at_p1"] is True
    loaded = ParScaleForCausalLM.from_pretrained(tmp_path / "control")
    assert loaded.parscale_config.prefix_at_p1
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, model(_ids()).logits)
    # A plain P = 1 model keeps the released layout: no new key, no prefix weights.
    to_parscale(tiny_factory("qwen2"), ParScaleConfig(1)).save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "parscale_prefix_at_p1" not in config and config["parscale_n"] == 1
    assert not list(ParScaleForCausalLM.from_pretrained(tmp_path / "plain").stream_parameters())


def test_only_for_one_stream():
    with pytest.raises(UserError, match="prefix_at_p1 is for n_streams=1"):
        ParScaleConfig(2, prefix_at_p1=True)
    with pytest.raises(UserError, match="true or false"):
        ParScaleConfig(1, prefix_at_p1="yes")
    assert ParScaleConfig.from_dict(ParScaleConfig(1, prefix_at_p1=True).to_dict()).prefix_at_p1
