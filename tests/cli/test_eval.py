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
    head, table = out.strip().split("\n\n")
    lines = dict(line.split(None, 1) for line in head.splitlines())
    assert lines["data"].startswith("stdlib (val split")
    assert lines["tokens"].startswith("500 (")
    header, row = table.splitlines()
    assert header.split() == ["streams", "P", "loss", "perplexity", "bits/byte", "tokens", "seconds"]
    name, n_streams, loss, perplexity, *_ = row.split()
    assert (name, n_streams) == ("default", "2")
    assert float(perplexity) == pytest.approx(math.exp(float(loss)), rel=1e-3)  # both printed rounded


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


def test_one_call_evaluates_the_base_and_every_stream_set_on_the_same_tokens(setup, capsys, tmp_path):
    """Each row equals the float64 loss of the full model with those streams; bits per byte by hand."""
    tok = setup["tok"]
    base = ParScaleForCausalLM.from_pretrained(setup["model"])  # a P = 2 model: its own streams are "default"
    plain = to_parscale(AutoModelForCausalLM.from_config(base.config), ParScaleConfig(n_streams=1))
    plain.load_state_dict({k: v for k, v in base.state_dict().items() if "prefix" not in k and "aggregate" not in k})
    plain.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    fulls = {}
    for n in (2, 4):
        full = to_parscale(AutoModelForCausalLM.from_config(base.config), ParScaleConfig(n_streams=n), seed=n)
        full.load_state_dict(plain.state_dict(), strict=False)  # the same backbone, new streams
        with torch.no_grad():
            full.model.aggregate_layer[2].weight.normal_(generator=torch.Generator().manual_seed(n))
        full.save_streams(tmp_path / f"ad{n}")
        fulls[f"p{n}"] = full
    out = _run(capsys, "--model", str(tmp_path / "base"), "--streams", f"p2={tmp_path / 'ad2'}", str(tmp_path / "ad4"),
               "--data", str(setup["texts"]), "--split", "all", "--seq-len", "32", "--max-tokens", "200",
               "--json", "--cache-dir", str(tmp_path / "cache"))
    result = json.loads(out)
    assert [(r["streams"], r["P"]) for r in result["sets"]] == [("base", 1), ("p2", 2), ("p4", 4)]
    tokens = [t for doc in DOCS for t in tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]][:200]
    n_bytes = sum(len(tok.decode(tokens[s + 1:s + 32]).encode()) for s in range(0, 200, 32))
    for row, model in zip(result["sets"], [plain, fulls["p2"], fulls["p4"]]):
        expected = _plain_nll(model, tokens, 32)
        assert row["loss"] == pytest.approx(expected, rel=1e-5), row["streams"]
        assert row["bits_per_byte"] == pytest.approx(expected * row["predictions"] / math.log(2) / n_bytes, rel=1e-3)
    assert len({r["loss"] for r in result["sets"]}) == 3 and result["loss"] == result["sets"][0]["loss"]
