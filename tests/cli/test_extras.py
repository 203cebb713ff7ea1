"""A missing optional extra is one line naming the extra to install, said before any work; a
training run without matplotlib trains and skips its plot with one note."""
from __future__ import annotations

import json
import logging
import sys

import pytest

from parscale.cli.main import main
from parscale.errors import UserError


def _without(monkeypatch, *modules: str) -> None:
    """Make `import module` fail as it does when the package is not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def one_error(capsys, argv: list[str], verb: str, *words: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"parscale {verb}: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert captured.out == ""  # nothing was computed or printed before the check
    return lines[0]


def test_lm_eval_without_the_eval_extra(monkeypatch, capsys, tmp_path):
    _without(monkeypatch, "lm_eval")
    # checked first: the directory below does not exist either, and is not what is reported
    one_error(capsys, ["lm-eval", "--model", "parscale", "--model_args", f"pretrained={tmp_path / 'nope'}"],
              "lm-eval", "the evaluation harness (lm-eval) needs lm_eval", 'pip install "parscale[eval]"')


def test_fit_plot_without_matplotlib_is_refused_before_the_fit(monkeypatch, capsys, tmp_path):
    _without(monkeypatch, "matplotlib")
    one_error(capsys, ["fit", "--data", "paper-stack", "--bootstrap", "0", "--plot", str(tmp_path / "f.png")],
              "fit", "--plot needs matplotlib", 'pip install "parscale[plot]"')
    assert not (tmp_path / "f.png").exists()


def test_cost_compare_plot_without_matplotlib(monkeypatch, capsys, tmp_path):
    _without(monkeypatch, "matplotlib")
    one_error(capsys, ["cost", "compare", "--preset", "0.5B", "--P", "2", "--plot", str(tmp_path / "c.png")],
              "cost", 'pip install "parscale[plot]"')


def test_parquet_without_pyarrow_names_the_train_extra(monkeypatch, capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["def f(x):\n    return x\n"] * 4}), tmp_path / "d.parquet")
    _without(monkeypatch, "pyarrow", "pyarrow.parquet")
    one_error(capsys, ["data", "prepare", "--data-files", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "o"),
                       "--workers", "0"], "data", f"reading the parquet file {tmp_path / 'd.parquet'} needs pyarrow",
              'pip install "parscale[train]"')


def test_datasets_reader_without_datasets_names_the_train_extra(monkeypatch, tmp_path):
    from parscale.data import corpus

    (tmp_path / "a.txt").write_text("some text\n")
    _without(monkeypatch, "datasets")
    with pytest.raises(UserError, match=r'needs datasets, which is not installed; install it with: '
                                        r'pip install "parscale\[train\]"'):
        corpus.load_documents([tmp_path / "a.txt"])


def test_a_missing_extra_found_late_is_still_one_line(monkeypatch, capsys):
    from parscale.cli import fit

    def late(argv):
        raise ModuleNotFoundError("No module named 'trl'", name="trl")

    monkeypatch.setattr(fit, "main", late)
    one_error(capsys, ["fit"], "fit", "this command needs trl", 'pip install "parscale[sft]"')

    def broken(argv):
        raise ModuleNotFoundError("No module named 'not_an_extra'", name="not_an_extra")

    monkeypatch.setattr(fit, "main", broken)
    with pytest.raises(ModuleNotFoundError):  # not an extra: a broken installation keeps its traceback
        main(["fit"])


MICRO = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "tie_word_embeddings": True, "vocab_size": 300}


def test_training_without_matplotlib_trains_and_skips_its_plot_once(monkeypatch, tmp_path, caplog):
    from parscale.data.corpus import stdlib_root
    from parscale.train import logs

    monkeypatch.setattr(logs, "_SKIPPED_PLOT", [])
    _without(monkeypatch, "matplotlib")
    (tmp_path / "micro.json").write_text(json.dumps(MICRO))
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="parscale"):
        assert main(["train", "--model-config", str(tmp_path / "micro.json"), "--data-files",
                     str(stdlib_root() / "textwrap.py"), "--data-val-files", str(stdlib_root() / "bisect.py"),
                     "--data-vocab-size", "300", "--P", "2", "--steps", "2", "--seq-len", "16", "--batch-size", "2",
                     "--eval-every", "1", "--out", str(run), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert (run / "final" / "config.json").is_file() and not (run / "loss.png").exists()
    notes = [r.getMessage() for r in caplog.records if "loss.png is not drawn" in r.getMessage()]
    assert notes == ['loss.png is not drawn: the loss plot needs matplotlib, which is not installed; '
                     'install it with: pip install "parscale[plot]"']
