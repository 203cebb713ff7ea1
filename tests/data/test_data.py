"""Data: corpus discovery and splits, user files, the tokenizer, packing, the cache, batches, loss."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

from parscale.data import corpus
from parscale.data.prepare import (
    DataConfig, batch_at, check_data, check_seq_len, check_vocab_size, evaluate_loss, prepare_data,
    split_documents, val_batches,
)
from parscale.data.batches import count_predictions
from parscale.errors import UserError
from parscale.data.tokenizer import EOS_TOKEN, train_bpe

# Distinct, code-like documents: enough text for a few hundred BPE merges.
DOCS = [f"def f{i}(x):\n    # note {i}\n    return x * {i} + {i % 7}  # résumé ✓\n" * (3 + i % 5) for i in range(40)]


def write_texts(folder, docs=DOCS):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(docs):
        (folder / f"doc{i:03d}.py").write_text(text, encoding="utf-8")
    return folder


def decode_docs(tok, ids) -> list[str]:
    """The documents of a packed array, found by splitting at EOS (an independent decoder path)."""
    eos = tok.eos_token_id
    ids = list(np.asarray(ids).tolist())
    assert ids and ids[-1] == eos  # every document, the last included, ends with EOS
    out, cur = [], []
    for t in ids:
        if t == eos:
            out.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    return out


# ----- config --------------------------------------------------------------------------
def test_config_round_trip_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(source="files", files=("a.txt",), val_fraction=0.1, vocab_size=512, seed=3)
    assert cfg.files == (str(tmp_path / "a.txt"),)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["files"] == [str(tmp_path / "a.txt")]
    assert DataConfig.from_dict(d) == cfg


@pytest.mark.parametrize("kwargs, words", [
    (dict(source="web"), "unknown data source"),
    (dict(source="files"), "at least one file"),
    (dict(source="stdlib", files=("x.txt",)), "takes no data files"),
    (dict(source="stdlib", val_files=("x.txt",)), "takes no data files"),
    (dict(val_fraction=0.0), "val_fraction"),
    (dict(vocab_size=100), "at least 257"),
    (dict(val_tokens=1), "val_tokens"),
])
def test_config_rejects_bad_values(kwargs, words):
    with pytest.raises(UserError, match=words):
        DataConfig(**kwargs)


def test_source_follows_the_files_when_not_given():
    assert DataConfig().source == "stdlib"
    assert DataConfig(files=("x.txt",)).source == "files"


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(UserError, match="unknown data option"):
        DataConfig.from_dict({"sorce": "stdlib"})


# ----- the standard-library corpus -------------------------------------------------------
def test_stdlib_files_exclude_tests_and_site_packages():
    root = corpus.stdlib_root()
    files = corpus.stdlib_files()
    rel = [p.relative_to(root).parts for p in files]
    assert len(files) > 100
    assert not any(set(parts[:-1]) & {"test", "tests", "idle_test", "site-packages"} for parts in rel)
    assert ("json", "decoder.py") in rel and ("os.py",) in rel
    assert [p.relative_to(root).as_posix() for p in files] == sorted(p.relative_to(root).as_posix() for p in files)


def test_split_by_file_is_disjoint_deterministic_and_about_the_fraction():
    names = [p.relative_to(corpus.stdlib_root()).as_posix() for p in corpus.stdlib_files()]
    a = corpus.split_keys(names, 0.02, seed=0)
    assert a == corpus.split_keys(names, 0.02, seed=0)
    assert a != corpus.split_keys(names, 0.02, seed=1)
    # A binomial(n, 0.02) count lies within 4 standard deviations with overwhelming probability.
    n = len(names)
    assert abs(sum(a) - 0.02 * n) < 4 * math.sqrt(n * 0.02 * 0.98) + 1


def test_split_keeps_one_document_on_each_side():
    assert sum(corpus.split_keys(["a", "b", "c"], 0.02, seed=0)) == 1
    assert sum(corpus.split_keys(["a", "b"], 0.99, seed=0)) == 1
    with pytest.raises(UserError, match="at least 2"):
        corpus.split_keys(["only"], 0.5, seed=0)


def test_stdlib_subset_end_to_end(tmp_path, monkeypatch):
    """A subset of the stdlib (to stay fast): files go whole to one split; tokens decode to them."""
    root = corpus.stdlib_root()
    subset = [p for p in corpus.stdlib_files() if p.relative_to(root).parts[0] in ("json", "email")]
    monkeypatch.setattr(corpus, "stdlib_files", lambda root=None: subset)
    seen = []
    import parscale.data.tokenizer as tokenizer_mod

    real_train_bpe = tokenizer_mod.train_bpe
    def spy(docs, size):  # the documents arrive as a stream: read it once, keep a copy
        seen.append(list(docs))
        return real_train_bpe(seen[-1], size)

    monkeypatch.setattr(tokenizer_mod, "train_bpe", spy)
    cfg = DataConfig(vocab_size=600, val_fraction=0.1, val_tokens=None)
    train_docs, val_docs = split_documents(cfg)
    texts = {p.read_text(encoding="utf-8") for p in subset} - {""}  # empty files are skipped
    assert set(train_docs) | set(val_docs) == texts and not set(train_docs) & set(val_docs)
    data = prepare_data(cfg, tmp_path / "cache")
    assert seen == [train_docs]  # the BPE saw the training split only
    assert decode_docs(data.tokenizer, data.train) == train_docs
    assert decode_docs(data.tokenizer, data.val) == val_docs
    assert data.vocab_size == len(data.tokenizer) == 600
    assert data.tokenizer.convert_ids_to_tokens(data.eos_id) == EOS_TOKEN


# ----- user files --------------------------------------------------------------------------
def test_text_files_one_document_each_with_auto_split(tmp_path):
    folder = write_texts(tmp_path / "texts")
    cfg = DataConfig(source="files", files=(str(folder),), vocab_size=400, val_fraction=0.2, val_tokens=None)
    data = prepare_data(cfg, tmp_path / "cache")
    train, val = decode_docs(data.tokenizer, data.train), decode_docs(data.tokenizer, data.val)
    assert sorted(train + val) == sorted(DOCS)  # whole documents, line breaks kept, nothing mixed
    assert val and train and not set(train) & set(val)
    assert data.stats["val_docs"] == len(val)
    capped = prepare_data(dataclasses.replace(cfg, val_tokens=50), tmp_path / "cache")
    assert capped.cache_path == data.cache_path  # the cap applies at load: the same cache entry
    assert np.array_equal(capped.val, data.val[:50]) and np.array_equal(capped.train, data.train)


def test_bpe_training_is_deterministic():
    # Two runs (or two ranks) that each train the tokenizer must agree token for token.
    assert train_bpe(DOCS, 300).backend_tokenizer.to_str() == train_bpe(DOCS, 300).backend_tokenizer.to_str()


def test_jsonl_parquet_and_separate_validation_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS[:30])))
    parquet = tmp_path / "more.parquet"
    pq.write_table(pa.table({"body": DOCS[30:36]}), parquet)
    val = tmp_path / "val.json"
    val.write_text("\n".join(json.dumps({"body": d}) for d in DOCS[36:]))
    cfg = DataConfig(source="files", files=(str(jsonl), str(parquet)), val_files=(str(val),),
                     text_field="body", vocab_size=400, val_tokens=None)
    data = prepare_data(cfg, tmp_path / "cache")
    assert decode_docs(data.tokenizer, data.train) == DOCS[:36]
    assert decode_docs(data.tokenizer, data.val) == DOCS[36:]


def test_compressed_files_are_read_by_their_inner_kind(tmp_path):
    import gzip

    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:3]))
    with gzip.open(tmp_path / "b.py.gz", "wt") as fh:
        fh.write(DOCS[3])
    assert corpus.file_kind(tmp_path / "a.jsonl.gz") == "json"
    assert corpus.load_documents([tmp_path / "a.jsonl.gz", tmp_path / "b.py.gz"], cache_dir=tmp_path / "hf") == DOCS[:4]


def test_jsonl_without_the_text_field_is_a_user_error(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(UserError, match="no field 'text'.*--data-text-field"):
        prepare_data(DataConfig(source="files", files=(str(jsonl),)), tmp_path / "cache")


def test_files_under_hidden_folders_are_skipped(tmp_path):
    """`.git/` objects and `.ipynb_checkpoints/` copies are not corpus, like hidden files."""
    root = tmp_path / ".project"  # a hidden folder given by name is read: only what is under it counts
    write_texts(root / "src", DOCS[:3])
    (root / ".git" / "objects" / "ab").mkdir(parents=True)
    (root / ".git" / "objects" / "ab" / "cdef").write_bytes(b"x\x9c\xff\xfe binary git object")
    (root / "src" / ".ipynb_checkpoints").mkdir()
    (root / "src" / ".ipynb_checkpoints" / "doc000-checkpoint.py").write_text(DOCS[0] + "# edited\n")
    (root / "src" / ".hidden.py").write_text("hidden file")
    found = corpus.check_files([root])
    assert [p.relative_to(root).as_posix() for p in found] == ["src/doc000.py", "src/doc001.py", "src/doc002.py"]
    assert corpus.load_documents([root], cache_dir=tmp_path / "hf") == DOCS[:3]


def test_validation_files_that_are_also_training_files_are_refused(tmp_path):
    folder = write_texts(tmp_path / "texts")
    (tmp_path / "link.py").symlink_to(folder / "doc005.py")  # the same file under another name
    for val in (folder / "doc003.py", tmp_path / "link.py", folder):
        cfg = DataConfig(source="files", files=(str(folder),), val_files=(str(val),), vocab_size=300)
        with pytest.raises(UserError, match=r"validation file\(s\) are also training files: .*(doc003|link|doc000)\.py"):
            prepare_data(cfg, tmp_path / "cache")
    other = write_texts(tmp_path / "heldout", DOCS[:2])  # the same text in other files is allowed
    prepare_data(DataConfig(source="files", files=(str(folder),), val_files=(str(other),), vocab_size=300),
                 tmp_path / "cache")


@pytest.mark.parametrize("make", ["missing", "empty_file", "empty_dir"])
def test_missing_or_empty_corpus_is_a_user_error(tmp_path, make):
    target = tmp_path / "data"
    if make == "empty_file":
        target = tmp_path / "empty.txt"
        target.write_text("  \n")
    elif make == "empty_dir":
        target.mkdir()
    with pytest.raises(UserError, match="does not exist|no text|holds no files"):
        prepare_data(DataConfig(source="files", files=(str(target),)), tmp_path / "cache")


# ----- tokenizer and cache --------------------------------------------------------------
def test_tokenizer_is_standard_and_reused_from_cache(tmp_path, monkeypatch):
    folder = write_texts(tmp_path / "texts")
    cfg = DataConfig(source="files", files=(str(folder),), vocab_size=400, val_fraction=0.2)
    data = prepare_data(cfg, tmp_path / "cache")
    tok_dir = data.cache_path / "tokenizer"
    for loaded in (AutoTokenizer.from_pretrained(tok_dir), PreTrainedTokenizerFast.from_pretrained(tok_dir)):
        assert loaded.eos_token == EOS_TOKEN and len(loaded) == len(data.tokenizer)
        assert loaded("résumé ✓ x")["input_ids"] == data.tokenizer("résumé ✓ x")["input_ids"]
    import parscale.data.tokenizer as tokenizer_mod

    monkeypatch.setattr(tokenizer_mod, "train_bpe", lambda *a, **k: pytest.fail("retrained a cached tokenizer"))
    again = prepare_data(cfg, tmp_path / "cache")
    assert again.cache_path == data.cache_path and np.array_equal(again.train, data.train)
    # A changed file gets a fresh cache entry, never the stale one.
    (folder / "doc000.py").write_text("changed\n" * 50)
    monkeypatch.undo()
    changed = prepare_data(cfg, tmp_path / "cache")
    assert changed.cache_path != data.cache_path
    assert "changed\n" * 50 in decode_docs(changed.tokenizer, changed.train) + decode_docs(changed.tokenizer, changed.val)


def test_an_interrupted_cache_is_rebuilt_not_read(tmp_path):
    from parscale.data import shards

    folder = write_texts(tmp_path / "texts")
    cfg = DataConfig(source="files", files=(str(folder),), vocab_size=300, val_fraction=0.2)
    data = prepare_data(cfg, tmp_path / "cache")
    val = np.array(data.val)
    # A kill while the val shard was written: the index does not list it, the file is garbage.
    index = shards.read_index(data.cache_path)
    index["splits"]["val"] = {"shards": [], "docs": 0, "tokens": 0, "complete": False}
    index.update({"pass": ["val"], "cursor": {"file": 0, "offset": 0, "ordinal": 0}})
    shards.write_index(data.cache_path, index)
    (data.cache_path / "val-00000.bin").write_bytes(b"\0" * 6)
    again = prepare_data(cfg, tmp_path / "cache")
    assert np.array_equal(again.val, val)


def test_vocab_size_changes_the_cache_key(tmp_path):
    folder = write_texts(tmp_path / "texts")
    small = prepare_data(DataConfig(source="files", files=(str(folder),), vocab_size=300), tmp_path / "c")
    large = prepare_data(DataConfig(source="files", files=(str(folder),), vocab_size=400), tmp_path / "c")
    assert small.cache_path != large.cache_path
    # This small corpus runs out of merges before 400: the BPE stops there, never above.
    assert small.vocab_size == 300 and 300 < large.vocab_size <= 400


def test_given_tokenizer_directory_is_used(tmp_path):
    folder = write_texts(tmp_path / "texts")
    tok = train_bpe(DOCS, 350)
    tok.save_pretrained(tmp_path / "tok")
    data = prepare_data(DataConfig(source="files", files=(str(folder),), tokenizer=str(tmp_path / "tok"),
                                   val_tokens=None), tmp_path / "cache")
    assert data.vocab_size == 350
    expected = [tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in DOCS]
    assert sorted(decode_docs(tok, data.train) + decode_docs(tok, data.val)) == sorted(DOCS)
    assert len(data.train) + len(data.val) == sum(map(len, expected))


def test_tokenizer_without_eos_is_a_user_error(tmp_path):
    tok = train_bpe(DOCS, 300)
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "tok")
    folder = write_texts(tmp_path / "texts")
    with pytest.raises(UserError, match="no EOS token"):
        prepare_data(DataConfig(source="files", files=(str(folder),), tokenizer=str(tmp_path / "tok")), tmp_path / "c")


# ----- batches -----------------------------------------------------------------------------
def test_batch_rows_are_chunks_and_an_epoch_visits_each_once():
    seq_len, batch, n_chunks = 8, 4, 12
    tokens = np.arange(n_chunks * seq_len + 5)  # a ragged tail that training never uses
    seen = []
    for step in range(n_chunks // batch):  # exactly one epoch
        x = batch_at(tokens, step, batch, seq_len, seed=7)
        assert x.dtype == torch.long and x.shape == (batch, seq_len)
        assert torch.all(x[:, 0] % seq_len == 0) and torch.all(x.diff(dim=1) == 1)  # aligned whole chunks
        seen += (x[:, 0] // seq_len).tolist()
    assert sorted(seen) == list(range(n_chunks))
    epoch2 = [c for s in range(3, 6) for c in (batch_at(tokens, s, batch, seq_len, seed=7)[:, 0] // seq_len).tolist()]
    assert sorted(epoch2) == list(range(n_chunks)) and epoch2 != seen  # a fresh shuffle
    assert not torch.equal(batch_at(tokens, 0, batch, seq_len, seed=8), batch_at(tokens, 0, batch, seq_len, seed=7))


def test_batch_is_pure_and_ranks_split_the_global_batch():
    tokens = np.random.default_rng(0).integers(0, 500, 10_000).astype(np.uint16)
    for step in (0, 5, 123):  # 123 straddles epochs: 78 chunks of 128
        whole = batch_at(tokens, step, 8, 128, seed=1)
        assert torch.equal(whole, batch_at(tokens, step, 8, 128, seed=1))
        parts = [batch_at(tokens, step, 8, 128, seed=1, rank=r, world_size=4) for r in range(4)]
        assert torch.equal(torch.cat(parts), whole)


def test_first_row_continues_the_same_order():
    """A run that skips `first_row` sequences sees rows first_row + step*B onwards of the one order."""
    tokens = np.random.default_rng(1).integers(0, 500, 5_000).astype(np.uint16)  # 39 chunks of 128
    rows = torch.cat([batch_at(tokens, s, 4, 128, seed=2) for s in range(16)])  # 64 rows: into epoch 1
    for first_row in (0, 4, 6, 37):
        for step in (0, 1, 2):
            start = first_row + step * 4
            torch.testing.assert_close(batch_at(tokens, step, 4, 128, seed=2, first_row=first_row), rows[start:start + 4])


def test_batch_errors():
    tokens = np.arange(100)
    with pytest.raises(UserError, match="does not divide"):
        batch_at(tokens, 0, 3, 8, world_size=2)
    with pytest.raises(UserError, match="fewer than one batch"):
        batch_at(tokens, 0, 16, 8)


def test_val_batches_cover_every_token_once_in_order():
    tokens = np.arange(10 * 7 + 3)
    batches = list(val_batches(tokens, seq_len=7, batch_size=4))
    assert [tuple(b.shape) for b in batches] == [(4, 7), (4, 7), (2, 7), (1, 3)]
    assert torch.equal(torch.cat([b.reshape(-1) for b in batches]), torch.from_numpy(tokens))
    assert count_predictions(len(tokens), 7) == sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    one_left = list(val_batches(np.arange(15), seq_len=7, batch_size=4))  # a 1-token tail predicts nothing
    assert [tuple(b.shape) for b in one_left] == [(2, 7)]


def test_check_data_needs_a_batch_and_a_validation_sequence(tmp_path):
    from parscale.data.prepare import PreparedData

    data = PreparedData(train=np.arange(64), val=np.arange(10), tokenizer=None, eos_id=0, vocab_size=64,
                        cache_path=tmp_path)
    check_data(data, seq_len=8, batch_size=8)
    with pytest.raises(UserError, match="train split has 64 tokens"):
        check_data(data, seq_len=8, batch_size=9)
    with pytest.raises(UserError, match="validation split has 10 tokens"):
        check_data(data, seq_len=16, batch_size=2)


# ----- model checks and the loss ----------------------------------------------------------
def test_check_seq_len_and_vocab_against_the_model():
    config = Qwen2Config(vocab_size=300, max_position_embeddings=64)
    check_seq_len(64, config)
    check_vocab_size(300, config)
    with pytest.raises(UserError, match="above the model's maximum of 64"):
        check_seq_len(65, config)
    with pytest.raises(UserError, match="301 tokens but the model's vocabulary holds 300"):
        check_vocab_size(301, config)


def _plain_nll(model, tokens, seq_len) -> float:
    """Float64, one sequence at a time, log-softmax and a Python sum: no shared code path."""
    model = model.double()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens), seq_len):
            seq = torch.as_tensor(tokens[start:start + seq_len], dtype=torch.long)
            if len(seq) < 2:
                continue
            logp = torch.log_softmax(model(input_ids=seq[None]).logits[0].double(), dim=-1)
            for t in range(len(seq) - 1):
                total -= float(logp[t, seq[t + 1]])
                count += 1
    return total / count


def test_evaluate_loss_equals_a_float64_loop(tiny_qwen2):
    tokens = np.random.default_rng(3).integers(0, 97, 16 * 5 + 6)
    tiny_qwen2.train()
    loss = evaluate_loss(tiny_qwen2, tokens, seq_len=16, batch_size=2, device="cpu")
    assert tiny_qwen2.training  # the mode it came in with
    first = evaluate_loss(tiny_qwen2, tokens, seq_len=16, batch_size=3, max_tokens=40, device="cpu")
    ref, ref_first = _plain_nll(tiny_qwen2, tokens, 16), _plain_nll(tiny_qwen2, tokens[:40], 16)
    # float32 logits against float64: agreement to ~1e-6 relative; 1e-5 leaves margin.
    assert loss == pytest.approx(ref, rel=1e-5) and first == pytest.approx(ref_first, rel=1e-5)
    assert abs(loss - first) > 1e-4  # max_tokens did change what was measured


def test_ranks_evaluate_shares_that_sum_to_the_whole_with_equal_forward_calls(tiny_qwen2):
    """Each of W ranks evaluates its share: the shares partition the predictions, their NLL
    sums add up to the one-process loss, and every rank makes the same number of calls (a
    sharded model's forward is a collective)."""
    from parscale.data.batches import evaluate_nll

    tokens = np.random.default_rng(4).integers(0, 97, 16 * 9 + 5)  # 9 chunks + a tail: 6 batches of <= 2 rows
    calls, rows = [0], []

    def counting(input_ids):
        calls[0] += 1
        rows.append(input_ids.shape[0])
        return tiny_qwen2(input_ids=input_ids)

    whole = evaluate_loss(tiny_qwen2, tokens, seq_len=16, batch_size=2)
    for world in (1, 2, 4):
        shares, per_rank = [], []
        for rank in range(world):
            calls[0] = 0
            shares.append(evaluate_nll(counting, tokens, 16, 2, rank=rank, world_size=world))
            per_rank.append(calls[0])
        assert sum(c for _, c in shares) == count_predictions(len(tokens), 16)
        assert sum(t for t, _ in shares) / sum(c for _, c in shares) == pytest.approx(whole, rel=1e-9)
        assert per_rank == [-(-6 // world)] * world  # ceil(6 batches / W), padded where short
        assert len({c for _, c in shares}) > 1 or world == 1  # the shares are really different
    assert max(rows) == 2  # never more rows than the batch size
    reduced = evaluate_loss(tiny_qwen2, tokens, seq_len=16, batch_size=2, rank=1, world_size=2,
                            reduce=lambda v: [a + b for a, b in zip(v, evaluate_nll(tiny_qwen2, tokens, 16, 2, rank=0,
                                                                                     world_size=2))])
    assert reduced == pytest.approx(whole, rel=1e-9)
