"""`parscale eval`: the reported loss is the exact mean token NLL; user mistakes exit 2 with a message."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, Qwen2Config

from parscale.data import corpus
from parscale.cli.main import main as cli_main
from parscale.cli.eval import main as eval_main
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import ParScaleForCausalLM, to_parscale
from parscale.data.tokenizer import train_bpe

DOCS = [f"class C{i}:\n    value = {i} * 'x'\n    def get(self):\n        return self.value  # {i}\n" * (2 + i % 4)
        for i in range(24)]


def _save_model(directory, tok, vocab_size=300, max_positions=64, n_streams=2):
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = to_parscale(AutoModelForCausalLM.from_config(config), ParScaleConfig(n_streams=n_streams), seed=1)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    texts = root / "texts"
    texts.mkdir()
    for i, doc in enumerate(DOCS):
        (texts / f"m{i:02d}.py").write_text(doc)
    tok = train_bpe(DOCS, 300)
    return {"root": root, "texts": texts, "tok": tok, "model": _save_model(root / "model", tok)}


def _plain_nll(model, tokens: list[int], seq_len: int) -> float:
    """Float64, one sequence at a time, an explicit sum over predictions."""
    model = model.double().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens), seq_len):
            seq = torch.tensor(tokens[start:start + seq_len])
            if len(seq) < 2:
                continue
            logp = torch.log_softmax(model(input_ids=seq[None]).logits[0].double(), dim=-1)
            total -= sum(float(logp[t, seq[t + 1]]) for t in range(len(seq) - 1))
            count += len(seq) - 1
    return total / count


def _run(capsys, *argv):
    code = eval_main(list(argv))
    assert code == 0
    return capsys.readouterr().out


def test_eval_reports_the_exact_loss_of_all_documents(setup, capsys, tmp_path):
    out = _run(capsys, "--model", str(setup["model"]), "--data", str(setup["texts"]), "--split", "all",
               "--seq-len", "32", "--batch-size", "3", "--max-tokens", "300", "--json", "--cache-dir", str(tmp_path))
    result = json.loads(out)
    tok = setup["tok"]
    tokens = [t for doc in DOCS for t in tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert result["documents"] == len(DOCS) and len(tokens) > 300
    tokens = tokens[:300]  # the documents in file order, packed by hand, then cut at --max-tokens
    expected = _plain_nll(ParScaleForCausalLM.from_pretrained(setup["model"]), tokens, 32)
    assert result["tokens"] == len(tokens)
    # float32 model against the float64 loop: ~1e-6 relative, 1e-5 leaves margin.
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    assert result["predictions"] == sum(min(32, len(tokens) - s) - 1 for s in range(0, len(tokens), 32))


def test_defaults_come_from_the_run_and_splits_partition_the_documents(setup, capsys, tmp_path):
    """A model in RUN_DIR/final takes the run's data, split and seq_len from RUN_DIR/config.yaml."""
    run = tmp_path / "run"
    ParScaleForCausalLM.from_pretrained(setup["model"]).save_pretrained(run / "final")
    setup["tok"].save_pretrained(run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "seq_len": 32, "eval_tokens": None,
        "data": {"source": "files", "files": [str(setup["texts"])], "val_fraction": 0.25, "seed": 3,
                 "val_tokens": None, "text_field": "text"}}))
    common = ["--model", str(run / "final"), "--json", "--cache-dir", str(tmp_path / "cache")]
    parts = {s: json.loads(_run(capsys, *common, "--split", s)) for s in ("train", "val", "all")}
    assert {p["seq_len"] for p in parts.values()} == {32}
    assert parts["val"]["documents"] == sum(corpus.split_keys(DOCS, 0.25, seed=3))
    assert parts["train"]["documents"] + parts["val"]["documents"] == len(DOCS)
    assert parts["train"]["tokens"] + parts["val"]["tokens"] == parts["all"]["tokens"]
    assert parts["train"]["loss"] != parts["val"]["loss"]


def test_table_output_and_stdlib_default(setup, capsys, tmp_path):
    out = _run(capsys, "--model", str(setup["model"]), "--seq-len", "32", "--max-tokens", "500",
               "--cache-dir", str(tmp_path))
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert lines["data"].startswith("stdlib (val split")
    assert lines["tokens"].startswith("500 (")
    loss = float(lines["loss"].split()[0])
    assert float(lines["perplexity"]) == pytest.approx(math.exp(loss), rel=1e-3)  # both printed rounded


@pytest.mark.parametrize("case, message", [
    ("no_model", "does not exist"),
    ("no_tokenizer", "no tokenizer"),
    ("seq_len", "above the model's maximum of 64"),
    ("vocab", "300 tokens but the model's vocabulary holds 280"),
    ("no_data", "does not exist"),
])
def test_user_mistakes_exit_2_with_a_message(setup, capsys, tmp_path, case, message):
    model, data, extra = setup["model"], str(setup["texts"]), []
    if case == "no_model":
        model = tmp_path / "nowhere"
    elif case == "no_tokenizer":
        model = tmp_path / "bare"
        ParScaleForCausalLM.from_pretrained(setup["model"]).save_pretrained(model)
    elif case == "seq_len":
        extra = ["--seq-len", "65"]
    elif case == "vocab":
        model = _save_model(tmp_path / "small_vocab", setup["tok"], vocab_size=280)
    elif case == "no_data":
        data = str(tmp_path / "typo.txt")
    code = cli_main(["eval", "--model", str(model), "--data", data, "--seq-len", "32", *extra,
                     "--cache-dir", str(tmp_path / "cache")])  # a repeated --seq-len: the last wins
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
