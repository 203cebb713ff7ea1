"""A directory given as a model (or a stream adapter) that is not one: every verb that takes a
model names what it is instead, in one line, before any model loads."""
from __future__ import annotations

import json
import shutil

import pytest
from _chartok import char_tokenizer

from parscale.cli.main import main
from parscale.cli.model_dir import check_model_dir
from parscale.data.tokenizer import train_bpe
from parscale.errors import UserError
from parscale.model.config import ParScaleConfig
from parscale.model.wrapper import ParScaleForCausalLM, to_parscale


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A backbone, a P = 2 model, its adapter, a run directory (finished and not), a checkpoint,
    a prepared data directory, an empty folder and a damaged config.json."""
    from conftest import build_tiny

    root = tmp_path_factory.mktemp("dirs")
    backbone = build_tiny("qwen2")
    backbone.save_pretrained(root / "backbone")
    char_tokenizer().save_pretrained(root / "backbone")
    model = to_parscale(build_tiny("qwen2"), ParScaleConfig(2, 3), seed=0).eval()
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    model.save_streams(root / "adapter", base_model_name_or_path=str(root / "backbone"))
    run = root / "run"  # what `parscale train` leaves: config.yaml, ckpt-N/model, final/, final-streams/
    (run / "ckpt-0000002").mkdir(parents=True)
    (run / "config.yaml").write_text("steps: 2\n")
    shutil.copytree(root / "model", run / "ckpt-0000002" / "model")
    shutil.copytree(root / "model", run / "final")
    shutil.copytree(root / "adapter", run / "final-streams")
    unfinished = root / "unfinished"
    shutil.copytree(run, unfinished, ignore=shutil.ignore_patterns("final*"))
    (root / "text.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    (root / "more.txt").write_text("class c:\n    x = 1\n" * 40)
    train_bpe([(root / "text.txt").read_text(), (root / "more.txt").read_text()], 300).save_pretrained(root / "tok")
    assert main(["data", "prepare", "--data-files", str(root / "text.txt"), str(root / "more.txt"),
                 "--data-tokenizer", str(root / "tok"), "--data-val-fraction", "0.5",
                 "--out", str(root / "data"), "--workers", "0"]) == 0
    (root / "empty").mkdir()
    shutil.copytree(root / "model", root / "damaged")
    (root / "damaged" / "config.json").write_text('{"model_type": "qwen2", ')
    return root


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Loading a model here is a failure: every diagnosis must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the directory was checked")

    monkeypatch.setattr(ParScaleForCausalLM, "from_pretrained", refuse)


def one_error(capsys, argv: list[str], verb: str, *words: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"parscale {verb}: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_a_run_directory_names_its_final_model(world, capsys):
    one_error(capsys, ["eval", "--model", str(world / "run")], "eval",
              f"{world / 'run'} is a run directory; its model is {world / 'run' / 'final'}")


def test_an_unfinished_run_names_its_newest_checkpoint_and_resume(world, capsys):
    run = world / "unfinished"
    one_error(capsys, ["generate", "--model", str(run), "--prompt", "x"], "generate",
              "run directory without final/", str(run / "ckpt-0000002" / "model"), f"parscale train --resume {run}")


def test_a_checkpoint_names_its_model(world, capsys):
    ckpt = world / "run" / "ckpt-0000002"
    one_error(capsys, ["eval", "--model", str(ckpt)], "eval", "is a training checkpoint", str(ckpt / "model"))


def test_a_stream_adapter_says_how_to_load_it_on_its_backbone(world, capsys):
    one_error(capsys, ["generate", "--model", str(world / "adapter"), "--prompt", "x"], "generate",
              f"{world / 'adapter'} is a stream adapter: use --model {world / 'backbone'} --streams {world / 'adapter'}")


def test_a_prepared_data_directory_is_not_a_model(world, capsys):
    one_error(capsys, ["eval", "--model", str(world / "data")], "eval",
              f"{world / 'data'} is a prepared data directory (from `parscale data prepare`), not a model")


def test_a_folder_without_config_json(world, capsys):
    one_error(capsys, ["generate", "--model", str(world / "empty"), "--prompt", "x"], "generate",
              f"{world / 'empty'} has no config.json")


def test_a_damaged_config_json_quotes_the_parser(world, capsys):
    line = one_error(capsys, ["eval", "--model", str(world / "damaged")], "eval",
                     f"{world / 'damaged' / 'config.json'} is not valid JSON: ")
    try:
        json.loads((world / "damaged" / "config.json").read_text())
    except json.JSONDecodeError as err:
        assert str(err) in line


def test_lm_eval_checks_pretrained_and_streams_before_lm_eval_loads(world, capsys):
    one_error(capsys, ["lm-eval", "--model", "parscale", "--model_args", f"pretrained={world / 'run'}"], "lm-eval",
              f"give pretrained={world / 'run' / 'final'}")
    one_error(capsys, ["lm-eval", "--model", "parscale", "--model_args",
                       f"pretrained={world / 'backbone'},streams={world / 'model'}", "--tasks", "t"], "lm-eval",
              f"{world / 'model'} is a full model, not a stream adapter", "parscale streams extract")


def test_streams_given_a_run_directory_names_its_adapter(world, capsys):
    one_error(capsys, ["eval", "--model", str(world / "backbone"), "--streams", f"p2={world / 'run'}"], "eval",
              f"its stream adapter is {world / 'run' / 'final-streams'}")


def test_streams_extract_checks_model_base_and_out_before_loading(world, capsys, tmp_path):
    one_error(capsys, ["streams", "extract", "--model", str(world / "adapter"), "--out", str(tmp_path / "a")],
              "streams", "is a stream adapter: it is already an adapter")
    one_error(capsys, ["streams", "extract", "--model", str(world / "model"), "--base", str(world / "data"),
                       "--out", str(tmp_path / "a")], "streams", "is a prepared data directory")
    one_error(capsys, ["streams", "extract", "--model", str(world / "model"), "--out", str(world / "text.txt")],
              "streams", "--out", "is a file")
    one_error(capsys, ["streams", "extract", "--model", str(world / "model"), "--out", str(world / "backbone")],
              "streams", "already holds other files")
    assert not (tmp_path / "a").exists()


def test_the_check_is_reusable_for_train_init_from(world):
    with pytest.raises(UserError, match="is a stream adapter: it holds streams without their backbone; "
                                        "give --init-from a full model directory"):
        check_model_dir(world / "adapter", "--init-from")
    with pytest.raises(UserError, match="give --init-from '.*/run/final'"):
        check_model_dir(world / "run", "--init-from")
    assert check_model_dir(world / "backbone", "--init-from") == world / "backbone"


def test_cost_reads_a_model_directory_and_names_a_run_directory(world, capsys):
    one_error(capsys, ["cost", "--hf-config", str(world / "run")], "cost", f"give --hf-config '{world / 'run' / 'final'}'")
    capsys.readouterr()
    assert main(["cost", "--hf-config", str(world / "backbone" / "config.json"), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(["cost", "--hf-config", str(world / "backbone"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_file


def test_train_init_from_a_run_or_data_directory_is_named_before_any_work(world, capsys, tmp_path):
    one_error(capsys, ["train", "--init-from", str(world / "run"), "--P", "2", "--out", str(tmp_path / "r")],
              "train", f"{world / 'run'} is a run directory; its model is {world / 'run' / 'final'}")
    one_error(capsys, ["train", "--init-from", str(world / "data"), "--P", "2", "--out", str(tmp_path / "r")],
              "train", "is a prepared data directory")
    assert not (tmp_path / "r").exists()  # nothing was written
