"""lm-evaluation-harness: our model (a backbone + a stream adapter) scores a tiny local
multiple-choice task exactly as our own log-likelihood computation does; rolling
log-likelihood and generate_until agree with our model too; lm-eval does not warn that it
was handed a loaded model. Offline: the task and its data are written by the test."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from parscale.data.tokenizer import train_bpe  # noqa: E402
from parscale.evaluate.harness import ParScaleLM  # noqa: E402
from parscale.model.config import ParScaleConfig  # noqa: E402
from parscale.model.wrapper import ParScaleForCausalLM, to_parscale  # noqa: E402

QUESTIONS = [
    {"question": "def add(a, b): return", "choices": ["a + b", "a - b", "None"], "answer": 0},
    {"question": "import os; os.path.", "choices": ["join", "split", "exists"], "answer": 1},
    {"question": "for i in", "choices": ["range(10):", "list:", "x"], "answer": 0},
]
TASK = """task: parscale_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
# What HFLM warns when `pretrained` is a loaded model rather than a name (ours loads its own).
LOADED_MODEL_WARNINGS = ("`pretrained` model kwarg is not of type `str`",
                         "Passed an already-initialized model through `pretrained`")
# A warning lm-eval does give here: the task above names no aggregation for its metric.
OTHER_WARNING = "metric acc is defined, but aggregation is not"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    texts = [q["question"] + " " + c for q in QUESTIONS for c in q["choices"]] * 20
    tok = train_bpe(texts, 300)
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    base = to_parscale(AutoModelForCausalLM.from_config(config), ParScaleConfig(n_streams=1))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    full = to_parscale(AutoModelForCausalLM.from_config(config), ParScaleConfig(n_streams=2, n_prefix_tokens=4), seed=3)
    full.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        full.model.aggregate_layer[2].weight.normal_(generator=torch.Generator().manual_seed(1))
    full.save_streams(root / "p2")
    (root / "data.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny.yaml").write_text(TASK.format(data=root / "data.jsonl"))
    return root, tok, full.eval()


def _our_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation token | everything before), float64, lm-eval's token split."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(n_context, len(whole)))


@pytest.mark.slow
def test_simple_evaluate_scores_equal_our_own_loglikelihoods(setup, caplog):
    caplog.set_level(logging.WARNING, logger="lm_eval")
    root, tok, full = setup
    out = lm_eval.simple_evaluate(model="parscale", model_args=f"pretrained={root / 'base'},streams={root / 'p2'}",
                                  tasks=["parscale_tiny_mc"], task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False),
                                  batch_size=2, log_samples=True)
    samples = out["samples"]["parscale_tiny_mc"]
    assert len(samples) == len(QUESTIONS)
    correct = 0
    for sample in samples:
        ours = [_our_loglikelihood(full, tok, *args) for args in sample["arguments"]]
        theirs = [resp[0][0] for resp in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        correct += int(max(range(len(ours)), key=ours.__getitem__) == sample["doc"]["answer"])
    assert out["results"]["parscale_tiny_mc"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval") and r.levelno >= logging.WARNING]
    assert not [m for m in warned if m.startswith(LOADED_MODEL_WARNINGS)]
    assert any(OTHER_WARNING in m for m in warned)  # lm-eval's other warnings still reach the log


def test_rolling_loglikelihood_and_generate_until_match_our_model(setup):
    root, tok, full = setup
    lm = ParScaleLM(pretrained=str(root / "base"), streams=str(root / "p2"), batch_size=1)
    text = "def add(a, b): return a + b"
    [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # lm-eval scores the first token after the end-of-text token
        prefix = [tok.eos_token_id] + ids
        logp = torch.log_softmax(full(torch.tensor([prefix])).logits[0].double(), dim=-1)
    assert rolling == pytest.approx(sum(float(logp[t, prefix[t + 1]]) for t in range(len(ids))), abs=1e-4)
    prompt = "import os; os.path."
    [generated] = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["\n\n"], "max_gen_toks": 6,
                                                                              "do_sample": False}), 0)])
    prompt_ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    ours = full.generate(prompt_ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert generated == tok.decode(ours[0, prompt_ids.shape[1]:], skip_special_tokens=True)
    assert math.isfinite(rolling)


@pytest.mark.slow
def test_the_command_line_takes_lm_evals_own_spellings(setup, tmp_path, monkeypatch, capfd):
    """`parscale lm-eval --model_args ... --include_path ...`, as lm-eval's docs spell them, through our
    CLI; its output has lm-eval's warnings but not the two about a loaded model."""
    from parscale.cli.main import main

    root, tok, full = setup
    monkeypatch.chdir(tmp_path)
    code = main(["lm-eval", "--model", "parscale", "--model_args", f"pretrained={root / 'base'},streams={root / 'p2'}",
                 "--include_path", str(root / "tasks"), "--tasks", "parscale_tiny_mc", "--device", "cpu",
                 "--output_path", str(tmp_path / "out")])
    assert code == 0
    printed = capfd.readouterr()
    printed = printed.out + printed.err
    assert not [m for m in LOADED_MODEL_WARNINGS if m in printed]
    assert OTHER_WARNING in printed
    [results] = list((tmp_path / "out").rglob("results_*.json"))
    acc = json.loads(results.read_text())["results"]["parscale_tiny_mc"]["acc,none"]
    correct = 0
    for q in QUESTIONS:
        ours = [_our_loglikelihood(full, tok, q["question"], " " + c) for c in q["choices"]]
        correct += int(max(range(len(ours)), key=ours.__getitem__) == q["answer"])
    assert acc == pytest.approx(correct / len(QUESTIONS))
