"""`import parscale` registers qwen2_parscale with the Auto classes; from_pretrained's keywords."""
from __future__ import annotations

import json
import string
import subprocess
import sys

import pytest
import torch
from _chartok import char_tokenizer

from parscale.errors import UserError
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import ParScaleForCausalLM, to_parscale


@pytest.fixture
def p2_dir(tiny_factory, tmp_path):
    model = to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 3), seed=1).eval()
    with torch.no_grad():
        model.model.aggregate_layer[2].weight.normal_(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "p2")
    char_tokenizer(string.ascii_lowercase + " ").save_pretrained(tmp_path / "p2")
    return tmp_path / "p2"


SCRIPT = """
import json, sys, warnings
{imports}
import torch
from transformers import AutoConfig, AutoModelForCausalLM, pipeline
config = AutoConfig.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor([[5, 6, 7, 8]])
out = {{"config": type(config).__name__, "P": config.parscale_n, "ours": [c.__name__ for c in type(model).__mro__][:2],
       "logits": model(ids).logits.sum().item()}}
if {with_pipeline}:
    pipe = pipeline("text-generation", model=sys.argv[1])
    out["text"] = pipe("abc", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("imports,with_pipeline", [
    ("import parscale", True),
    ("from transformers import AutoModelForCausalLM\nimport parscale", False),
    ("import parscale.model.wrapper", False),
])
def test_auto_classes_and_pipeline_load_our_model_without_remote_code(p2_dir, imports, with_pipeline):
    script = SCRIPT.format(imports=imports, with_pipeline=with_pipeline)
    run = subprocess.run([sys.executable, "-c", script, str(p2_dir)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["config"] == "Qwen2ParScaleConfig" and out["P"] == 2 and out["ours"] == ["Qwen2ParScaleForCausalLM", "ParScaleForCausalLM"]
    ours = ParScaleForCausalLM.from_pretrained(p2_dir)
    with torch.no_grad():
        assert out["logits"] == pytest.approx(ours(torch.tensor([[5, 6, 7, 8]])).logits.sum().item(), abs=1e-4)
    assert "not supported" not in run.stderr and "trust_remote_code" not in run.stderr
    if with_pipeline:
        tokenizer = char_tokenizer(string.ascii_lowercase + " ")
        ids = tokenizer("abc", return_tensors="pt")["input_ids"]
        expected = ours.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out["text"] == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("kwargs,dtype", [
    (dict(dtype=torch.bfloat16), torch.bfloat16),
    (dict(torch_dtype="float16"), torch.float16),
    (dict(dtype="auto", device_map="cpu", local_files_only=True), torch.float32),
    (dict(device_map="auto"), torch.float32),
    (dict(device_map=torch.device("cpu"), low_cpu_mem_usage=True, trust_remote_code=False), torch.float32),
    (dict(device_map={"": "cpu"}, attn_implementation="sdpa"), torch.float32),
])
def test_from_pretrained_takes_the_usual_keywords(p2_dir, kwargs, dtype):
    model = ParScaleForCausalLM.from_pretrained(p2_dir, **kwargs)
    assert {p.dtype for p in model.parameters()} == {dtype}
    expected_device = "cuda" if kwargs.get("device_map") == "auto" and torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in model.parameters()} == {expected_device}


@pytest.mark.parametrize("kwargs,needle", [
    (dict(load_in_8bit=True), "does not take load_in_8bit"),
    (dict(dtype=torch.int8), "floating torch dtype"),
    (dict(dtype="fp8"), "not one of"),
    (dict(device_map="balanced_low_0"), "not a device"),
    (dict(device_map={"model.layers.0": 0, "lm_head": "cpu"}), "split the model"),
    (dict(attn_implementation="flex_attention"), "stream prefixes run on sdpa, eager, flash_attention_2"),
    (dict(revision="v2"), "no revisions"),
    (dict(force_download=True), "never downloads"),
    (dict(dtype=torch.float16, torch_dtype=torch.bfloat16), "disagree"),
    (dict(n_streams=4), r"does not take n_streams; to give a plain checkpoint P streams, wrap it: to_parscale"),
    (dict(num_streams=4, load_in_8bit=True), r"does not take num_streams;.*ParScaleConfig\(n_streams=4\)"),
])
def test_other_keywords_are_refused_clearly(p2_dir, kwargs, needle):
    with pytest.raises(UserError, match=needle):
        ParScaleForCausalLM.from_pretrained(p2_dir, **kwargs)
