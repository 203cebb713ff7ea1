"""`parscale streams extract`: a full checkpoint's streams as an adapter, checked against a base."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from parscale.cli.main import main
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import ParScaleForCausalLM, to_parscale


def _save_full(tiny_factory, directory, seed=0):
    model = to_parscale(tiny_factory("qwen2", seed=seed), ParScaleConfig(4, 3), seed=7).eval()
    with torch.no_grad():
        model.model.aggregate_layer[2].weight.normal_()
    model.save_pretrained(directory)
    return model


def test_extract_gives_an_adapter_equal_to_the_full_model(tiny_factory, tmp_path):
    full = _save_full(tiny_factory, tmp_path / "full")
    tiny_factory("qwen2").save_pretrained(tmp_path / "base")
    assert main(["streams", "extract", "--model", str(tmp_path / "full"), "--out", str(tmp_path / "ad"),
                 "--base", str(tmp_path / "base")]) == 0
    weights = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert len(weights) == 2 * 2 + 4 and all("prefix" in k or "aggregate_layer" in k for k in weights)
    model = ParScaleForCausalLM.from_pretrained(tmp_path / "base")
    model.set_streams(model.load_streams(tmp_path / "ad"))
    full = ParScaleForCausalLM.from_pretrained(tmp_path / "full")  # loaded the same way as the model
    ids = torch.randint(2, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, full(ids).logits)


def test_extract_refuses_another_base_and_a_model_without_streams(tiny_factory, tmp_path, capsys):
    _save_full(tiny_factory, tmp_path / "full")
    tiny_factory("qwen2", seed=3).save_pretrained(tmp_path / "other")
    capsys.readouterr()  # drop the progress bar of saving
    code = main(["streams", "extract", "--model", str(tmp_path / "full"), "--out", str(tmp_path / "ad"),
                 "--base", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert code == 2 and "trained on another backbone" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ad").exists()
    code = main(["streams", "extract", "--model", str(tmp_path / "other"), "--out", str(tmp_path / "ad")])
    assert code == 2 and "has P = 1" in capsys.readouterr().err
