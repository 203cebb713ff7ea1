"""Training from a prepared, sharded data directory (`--data-dir`) against training from the files."""
from __future__ import annotations

from pathlib import Path

import pytest
from _trainkit import micro_setup, read_metrics, run_train, train_in_process

from parscale.data import shards
from parscale.data.prepare import DataConfig
from parscale.data.store import prepare_corpus
from parscale.data.tokenizer import load_tokenizer
from parscale.errors import UserError

STEPS = 6


@pytest.fixture(scope="module")
def from_files(tmp_path_factory):
    """A reference run on the files, and a data directory prepared from the same files with
    its tokenizer, in many small shards (so batches cross shard boundaries)."""
    root = tmp_path_factory.mktemp("datadir")
    opts = micro_setup(root)
    final = train_in_process(out=str(root / "files"), steps=STEPS, **opts)
    data = opts["data"]
    cfg = DataConfig(files=tuple(data["files"]), val_files=tuple(data["val_files"]), tokenizer=str(final))
    prepare_corpus(cfg, root / "prepared", workers=2, shard_tokens=3000)
    return root, opts, final


@pytest.mark.slow
def test_training_from_a_data_dir_reproduces_training_from_the_files(from_files):
    root, opts, final = from_files
    index = shards.read_index(root / "prepared")
    assert len(index["splits"]["train"]["shards"]) > 5
    # The trained model's tokenizer, saved again beside it, has the content of the cached BPE.
    (bpe,) = (Path(opts["cache_dir"])).glob("bpe-*/tokenizer")
    assert index["tokenizer"]["sha256"] == shards.tokenizer_hash(load_tokenizer(bpe))
    dir_opts = {**opts, "data": {"dir": str(root / "prepared"), "val_tokens": opts["data"]["val_tokens"]}}
    train_in_process(out=str(root / "dir"), steps=STEPS, **dir_opts)
    want, got = read_metrics(root / "files"), read_metrics(root / "dir")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in want]
    assert [r.get("val_loss") for r in got] == [r.get("val_loss") for r in want]
    # `parscale eval` on the model finds the run's data directory and measures its val_loss.
    from parscale.cli.eval import build_parser, evaluate

    result = evaluate(build_parser().parse_args(["--model", str(root / "dir" / "final"), "--device", "cpu"]))
    assert result["data"] == str(root / "prepared") and result["loss"] == pytest.approx(got[-1]["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_a_killed_run_on_a_data_dir_resumes_to_the_same_losses(from_files):
    root, opts, _ = from_files
    args = ["--model-config", opts["model_config"], "--data-dir", str(root / "prepared"), "--seq-len", "32",
            "--batch-size", "4", "--lr", "3e-3", "--eval-every", "4", "--save-every", "2", "--steps", str(STEPS),
            "--data-val-tokens", "4096", "--cache-dir", opts["cache_dir"], "--out", str(root / "killed")]
    killed = run_train(args, PARSCALE_KILL_DURING_STEP="4")
    assert killed.returncode != 0
    resumed = run_train(["--resume", str(root / "killed")])
    assert resumed.returncode == 0, resumed.stderr
    want = read_metrics(root / "files")
    assert [r["train_loss"] for r in read_metrics(root / "killed")] == [r["train_loss"] for r in want]


def test_a_data_dir_with_another_tokenizer_or_unfinished_is_refused(tmp_path):
    from parscale.data.tokenizer import train_bpe

    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.txt").write_text(f"text number {i} " * (20 + i))
    tok = tmp_path / "tok"
    train_bpe([p.read_text() for p in folder.iterdir()], 300).save_pretrained(tok)
    prepare_corpus(DataConfig(files=(str(folder),), tokenizer=str(tok), val_fraction=0.3), tmp_path / "d")
    other = tmp_path / "other"
    train_bpe(["something else entirely"] * 3, 270).save_pretrained(other)
    result = run_train(["--data-dir", str(tmp_path / "d"), "--data-tokenizer", str(other), "--out", str(tmp_path / "r")])
    assert result.returncode == 2 and "another tokenizer" in result.stderr and "Traceback" not in result.stderr
    index = shards.read_index(tmp_path / "d")
    index["splits"]["train"]["complete"] = False
    shards.write_index(tmp_path / "d", index)
    with pytest.raises(UserError, match="did not finish.*resumes"):
        from parscale.data.prepare import prepare_data

        prepare_data(DataConfig(dir=str(tmp_path / "d")), tmp_path / "cache")
