"""Checks that need no model (or no training run) come first, and each message names the command
and the option that fixes the problem."""
from __future__ import annotations

import pytest
from _chartok import char_tokenizer

from parscale.cli.main import main
from parscale.data.tokenizer import train_bpe
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import ParScaleForCausalLM, to_parscale

DOCS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (3 + i % 5) for i in range(40)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    for i, doc in enumerate(DOCS):
        (root / f"m{i:02d}.py").write_text(doc)
    train_bpe(DOCS, 300).save_pretrained(root / "tok")
    return root


def _prepare(corpus, out, *extra: str) -> int:
    files = [str(corpus / f"m{i:02d}.py") for i in range(len(DOCS))]
    return main(["data", "prepare", "--data-files", *files, "--data-tokenizer", str(corpus / "tok"),
                 "--out", str(out), "--workers", "0", *extra])


def test_prepare_says_at_once_when_the_validation_split_is_too_small(corpus, tmp_path, capsys):
    import json

    assert _prepare(corpus, tmp_path / "small", "--data-val-fraction", "0.01", "--json") == 0
    captured = capsys.readouterr()
    val_tokens = json.loads(captured.out)["splits"]["val"]["tokens"]
    assert 0 < val_tokens < 128  # what makes this case: under the default --seq-len of training
    assert captured.err.strip().splitlines()[-1] == (
        f"parscale data prepare: warning: the validation split holds {val_tokens} tokens, fewer than one "
        f"sequence at the default --seq-len 128 of `parscale train`, which then fails unless --seq-len is at "
        f"most {val_tokens}; prepare again into a new --out with a larger --data-val-fraction (now 0.01) or "
        "separate --data-val-files")
    assert _prepare(corpus, tmp_path / "enough", "--data-val-fraction", "0.5") == 0
    assert "warning" not in capsys.readouterr().err


def test_training_on_too_small_a_prepared_split_names_the_prepare_option(corpus, tmp_path):
    from parscale.data.config import DataConfig
    from parscale.data.prepare import check_data, prepare_data
    from parscale.errors import UserError

    assert _prepare(corpus, tmp_path / "small", "--data-val-fraction", "0.01") == 0
    data = prepare_data(DataConfig(dir=str(tmp_path / "small")), cache_dir=tmp_path / "cache")
    assert len(data.val) < 128 <= len(data.train) // 8
    with pytest.raises(UserError, match=r"prepare .*small again into a new directory with a larger "
                                        r"`parscale data prepare --data-val-fraction` \(or with --data-val-files\), "
                                        rf"or lower --seq-len to at most {len(data.val)}"):
        check_data(data, seq_len=128, batch_size=8)
    check_data(data, seq_len=len(data.val), batch_size=8)  # the advice holds: at that --seq-len it passes


def _one_error(capsys, verb: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"parscale {verb}: error: "), lines
    return lines[0]


def test_preparing_again_with_another_option_names_it_and_both_values(corpus, tmp_path, capsys):
    assert _prepare(corpus, tmp_path / "d", "--data-val-fraction", "0.5") == 0
    before = sorted(p.name for p in (tmp_path / "d").iterdir())
    capsys.readouterr()
    assert _prepare(corpus, tmp_path / "d", "--data-val-fraction", "0.25", "--data-seed", "3") == 2
    line = _one_error(capsys, "data")
    assert "--data-val-fraction was 0.5, now 0.25" in line and "--data-seed was 0, now 3" in line
    assert "--data-files" not in line and "--data-text-field" not in line  # only what differs
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == before
    (corpus / "m03.py").write_text(DOCS[3] + "# edited\n")
    try:
        assert _prepare(corpus, tmp_path / "d", "--data-val-fraction", "0.5") == 2
        line = _one_error(capsys, "data")
        assert f"files changed since (their sizes or times differ): {(corpus / 'm03.py').resolve()}" in line
    finally:
        (corpus / "m03.py").write_text(DOCS[3])


def test_generate_chat_without_a_template_fails_before_the_model_loads(tmp_path, tiny_factory, monkeypatch, capsys):
    to_parscale(tiny_factory("qwen2"), ParScaleConfig(2, 3), seed=0).save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the chat template was checked")

    monkeypatch.setattr(ParScaleForCausalLM, "from_pretrained", refuse)
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "m"), "--chat", "--prompt", "hi"]) == 2
    line = _one_error(capsys, "generate")
    assert "has no chat template, so --chat cannot format messages; drop --chat" in line
