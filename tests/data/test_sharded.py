"""Sharded preparation: the same tokens as the in-memory path, shards, resume, bad input, the cache."""
from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from parscale.data import pipeline, shards, store
from parscale.data.batches import batch_at, val_batches
from parscale.data.prepare import DataConfig, prepare_data, split_documents, tokenize_documents
from parscale.data.shards import ShardedTokens
from parscale.data.tokenizer import load_tokenizer, train_bpe
from parscale.errors import UserError

DOCS = [f"def g{i}(y):\n    return y ** {i} - {i % 5}  # ünïcode ✓ {i}\n" * (2 + i % 7) for i in range(60)]


def write_corpus(folder):
    """The same documents as text files, a JSON Lines file and a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(DOCS[:20]):
        (folder / f"a{i:02d}.py").write_text(text, encoding="utf-8")
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[20:45]))
    pq.write_table(pa.table({"text": DOCS[45:]}), folder / "c.parquet")
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok"
    train_bpe(DOCS, 400).save_pretrained(path)
    return path


def concat(directory, split):
    index = shards.read_index(directory)
    return np.asarray(shards.split_tokens(directory, index, split)), index


# ----- the tokens ------------------------------------------------------------------------
@pytest.mark.slow
def test_stdlib_tokens_equal_the_in_memory_path(tmp_path):
    """The whole embedded corpus: today's list-of-documents path, computed independently."""
    cfg = DataConfig(vocab_size=2048, val_tokens=None)
    data = prepare_data(cfg, tmp_path / "cache")
    train_docs, val_docs = split_documents(cfg)
    tok = train_bpe(train_docs, 2048)
    assert tok.backend_tokenizer.to_str() == data.tokenizer.backend_tokenizer.to_str()
    assert np.array_equal(np.asarray(data.train), tokenize_documents(train_docs, tok))
    assert np.array_equal(np.asarray(data.val), tokenize_documents(val_docs, tok))


def test_workers_and_shards_give_the_in_memory_tokens(tmp_path, tok_dir):
    folder = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(files=(str(folder),), tokenizer=str(tok_dir), val_fraction=0.2)
    out = tmp_path / "out"
    result = store.prepare_corpus(cfg, out, workers=2, shard_tokens=700)
    tok = load_tokenizer(tok_dir)
    train_docs, val_docs = split_documents(cfg)
    assert result["splits"]["train"]["docs"] == len(train_docs) and result["splits"]["val"]["docs"] == len(val_docs)
    train, index = concat(out, "train")
    assert np.array_equal(train, tokenize_documents(train_docs, tok))
    assert np.array_equal(concat(out, "val")[0], tokenize_documents(val_docs, tok))
    listed = index["splits"]["train"]["shards"]
    assert len(listed) > 3 and sum(s["tokens"] for s in listed) == len(train)
    for shard in listed:  # each shard ends a document, and holds what the index says
        tokens = np.fromfile(out / shard["file"], dtype=np.uint16)
        assert tokens[-1] == tok.eos_token_id and len(tokens) == shard["tokens"]
        assert (tokens == tok.eos_token_id).sum() == shard["docs"]
    assert index["tokenizer"]["sha256"] == shards.tokenizer_hash(tok)
    assert [row[1] for row in index["inputs"]["files"]] == [p.stat().st_size for p in sorted(folder.iterdir())]


def test_tiny_corpus_keeps_one_document_for_validation(tmp_path, tok_dir):
    """The split's small-corpus rule (one document moves so neither side is empty) holds here too."""
    folder = tmp_path / "few"
    folder.mkdir()
    for i, text in enumerate(DOCS[:4]):
        (folder / f"{i}.txt").write_text(text)
    cfg = DataConfig(files=(str(folder),), tokenizer=str(tok_dir), val_fraction=0.001, val_tokens=None)
    train_docs, val_docs = split_documents(cfg)
    assert len(val_docs) == 1  # the rule applied: 0.001 of 4 documents rounds to none
    data = prepare_data(cfg, tmp_path / "cache")
    assert np.array_equal(np.asarray(data.val), tokenize_documents(val_docs, data.tokenizer))
    assert np.array_equal(np.asarray(data.train), tokenize_documents(train_docs, data.tokenizer))


# ----- reading across shards ---------------------------------------------------------------
def test_sharded_view_reads_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 500, size=n).astype(np.uint16) for n in (37, 1, 80, 13, 64)]
    whole, view = np.concatenate(parts), ShardedTokens(parts)
    assert len(view) == len(whole)
    for a, b in [(0, 195), (30, 40), (37, 38), (36, 120), (150, 150), (-20, None)]:
        assert np.array_equal(np.asarray(view[a:b]), whole[a:b])
    assert np.array_equal(np.asarray(view[10:150][5:70]), whole[10:150][5:70])
    assert view[118] == whole[118] and view[-1] == whole[-1]
    for step in range(12):  # every rank's rows of every global batch: batches straddle shards
        for world in (1, 2, 4):
            for rank in range(world):
                args = dict(step=step, batch_size=4, seq_len=9, seed=3, rank=rank, world_size=world)
                assert torch_equal(batch_at(view, **args), batch_at(whole, **args))
    got = [b.numpy() for b in val_batches(view, seq_len=16, batch_size=3)]
    assert all(np.array_equal(g, w.numpy()) for g, w in zip(got, val_batches(whole, seq_len=16, batch_size=3)))


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


# ----- interruption, full disk, bad input ---------------------------------------------------
def test_an_interrupted_prepare_resumes_to_the_same_tokens(tmp_path, tok_dir):
    folder = write_corpus(tmp_path / "corpus")
    out, ref = tmp_path / "out", tmp_path / "ref"
    cmd = [sys.executable, "-m", "parscale", "data", "prepare", "--data-files", str(folder), "--data-tokenizer",
           str(tok_dir), "--workers", "0", "--shard-tokens", "500", "--data-val-fraction", "0.2"]
    env = {**__import__("os").environ, "TQDM_DISABLE": "1", pipeline.KILL_AFTER_COMMITS_ENV: "3"}
    killed = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    index = shards.read_index(out)
    assert not index["splits"]["train"]["complete"] and index["cursor"] is not None
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # it died inside a shard
    del env[pipeline.KILL_AFTER_COMMITS_ENV]
    resumed = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the prepare" in resumed.stderr
    store.prepare_corpus(DataConfig(files=(str(folder),), tokenizer=str(tok_dir), val_fraction=0.2), ref)
    for split in shards.SPLITS:
        assert np.array_equal(concat(out, split)[0], concat(ref, split)[0])
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_a_full_disk_keeps_the_last_complete_shard(tmp_path, tok_dir, monkeypatch):
    folder = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(files=(str(folder),), tokenizer=str(tok_dir), val_fraction=0.2)
    real_write, calls = shards.ShardWriter.write, []

    def write(self, tokens, docs):
        calls.append(1)
        if len(calls) == 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, tokens, docs)

    monkeypatch.setattr(shards.ShardWriter, "write", write)
    with pytest.raises(UserError, match="disk is full.*complete shard.*run the same command to resume"):
        store.prepare_corpus(cfg, tmp_path / "out", shard_tokens=500)
    index = shards.read_index(tmp_path / "out")
    assert index["splits"]["train"]["shards"] and not index["splits"]["train"]["complete"]
    for shard in index["splits"]["train"]["shards"]:  # every listed shard is whole
        assert (tmp_path / "out" / shard["file"]).stat().st_size == 2 * shard["tokens"]
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out").iterdir())
    monkeypatch.undo()
    store.prepare_corpus(cfg, tmp_path / "out", shard_tokens=500)
    store.prepare_corpus(cfg, tmp_path / "ref")
    assert np.array_equal(concat(tmp_path / "out", "train")[0], concat(tmp_path / "ref", "train")[0])


def test_bad_files_are_named_with_the_line_or_the_byte_offset(tmp_path, tok_dir, caplog):
    folder = write_corpus(tmp_path / "corpus")
    good = (folder / "b.jsonl").read_bytes()
    lines = good.splitlines(keepends=True)
    bad_line = b'{"text": "caf\xe9"}\n'  # Latin-1, not UTF-8
    offset = len(b"".join(lines[:3])) + bad_line.index(b"\xe9")
    (folder / "b.jsonl").write_bytes(b"".join(lines[:3]) + bad_line + b"".join(lines[3:]))
    (folder / "z.txt").write_bytes(b"ok\n\xff\xfe")
    cfg = DataConfig(files=(str(folder),), tokenizer=str(tok_dir), val_fraction=0.2)
    with pytest.raises(UserError, match=r"b\.jsonl, line 4: not UTF-8.*--on-bad-file skip"):  # a JSON line: its number
        store.prepare_corpus(cfg, tmp_path / "failed")
    with caplog.at_level(logging.WARNING):
        result = store.prepare_corpus(cfg, tmp_path / "out", on_bad_file="skip")
    assert [(s["path"].rsplit("/", 1)[-1], s["offset"], s["line"]) for s in result["skipped"]] == [
        ("b.jsonl", offset, 4), ("z.txt", 3, None)]
    assert result["splits"]["train"]["docs"] + result["splits"]["val"]["docs"] == len(DOCS)  # the rest is read
    assert "z.txt at byte 3" in caplog.text


def test_a_different_tokenizer_is_refused(tmp_path, tok_dir):
    folder = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    store.prepare_corpus(DataConfig(files=(str(folder),), tokenizer=str(tok_dir)), out)
    other = tmp_path / "other"
    train_bpe(DOCS, 300).save_pretrained(other)
    with pytest.raises(UserError, match="another tokenizer"):
        store.prepare_corpus(DataConfig(files=(str(folder),), tokenizer=str(other)), out)
    with pytest.raises(UserError, match="another tokenizer"):
        prepare_data(DataConfig(dir=str(out), tokenizer=str(other)), tmp_path / "cache")
    data = prepare_data(DataConfig(dir=str(out), tokenizer=str(tok_dir)), tmp_path / "cache")
    assert data.vocab_size == len(load_tokenizer(tok_dir)) and data.cache_path == out


# ----- the cache ---------------------------------------------------------------------------
def test_reuse_is_logged_only_when_true_and_keyed_by_tokenizer_content(tmp_path, caplog, monkeypatch):
    folder = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(files=(str(folder),), vocab_size=350, val_fraction=0.2)
    with caplog.at_level(logging.INFO, logger="parscale"):
        first = prepare_data(cfg, tmp_path / "cache")
    assert "reusing" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="parscale"):
        again = prepare_data(cfg, tmp_path / "cache")
    assert f"reusing cached data in {first.cache_path}" in caplog.text
    assert np.array_equal(np.asarray(again.train), np.asarray(first.train))
    # The same tokenizer saved elsewhere (beside a trained model) finds the same entry:
    # nothing is tokenized again.
    saved = tmp_path / "final"
    first.tokenizer.save_pretrained(saved)
    monkeypatch.setattr(pipeline, "prepare_dir", lambda *a, **k: pytest.fail("tokenized the corpus again"))
    post = prepare_data(DataConfig(files=(str(folder),), tokenizer=str(saved), val_fraction=0.2), tmp_path / "cache")
    assert post.cache_path == first.cache_path


def test_cli_bad_file_is_one_line_and_exit_2(tmp_path, tok_dir):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text\n" * 20)
    (folder / "b.txt").write_bytes(b"fine\n" * 10 + b"\xc3(")
    env = {**__import__("os").environ, "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-m", "parscale", "data", "prepare", "--data-files", str(folder),
                          "--data-tokenizer", str(tok_dir), "--out", str(tmp_path / "out"), "--workers", "0"],
                         capture_output=True, text=True, env=env, timeout=120)
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert errors == [f"parscale data: error: cannot read {folder / 'b.txt'} at byte 50: not UTF-8 "
                      "(invalid continuation byte); fix or remove the file (`parscale data prepare --on-bad-file "
                      "skip` leaves it out)"]
