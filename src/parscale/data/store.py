"""The tokenized-data cache: one prepared directory per (corpus, split, tokenizer content).

    CACHE/
      bpe-<key>/tokenizer/   a byte-level BPE trained on a corpus's training split
      <key>/                 a prepared directory (see `parscale.data.shards`)

The entry's key hashes the input files' paths, sizes and times, the split options and the
tokenizer's *content* (`shards.tokenizer_hash`), not its path: a post-training run that
reads the trained model's tokenizer from `RUN_DIR/final`, an evaluation and the demo all
find the entry the first run made, and never tokenize the same corpus twice with the same
tokenizer. "reusing cached data" is logged only when an entry is reused as it stands.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from parscale.data import pipeline, shards, sources
from parscale.data import tokenizer as bpe  # bpe.train_bpe, looked up at call time: tests patch it
from parscale.data.tokenizer import load_cached_tokenizer, load_tokenizer, save_tokenizer
from parscale.errors import UserError

log = logging.getLogger(__name__)

_FORMAT = 2  # bump when the cached layout or the tokenisation changes
split_tokens = shards.split_tokens


def inputs_of(cfg) -> tuple[list[sources.Input], str]:
    """The input files of a DataConfig (the stdlib's own, or the user's) and the source name."""
    if cfg.source == "stdlib":
        inputs = sources.stdlib_inputs()
        if not inputs:
            raise UserError("no readable .py files found in the Python standard library; "
                                     "give your own files (--data-files)")
        return inputs, "stdlib"
    return sources.file_inputs(cfg.files, cfg.val_files), "files"


def options_of(cfg, splits: Sequence[str] = shards.SPLITS, workers: int = 0) -> pipeline.PrepareOptions:
    return pipeline.PrepareOptions(text_field=cfg.text_field, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                   splits=tuple(splits), workers=workers)


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def corpus_key(cfg, inputs: Sequence[sources.Input]) -> str:
    """Everything the documents and their split depend on (not the tokenizer)."""
    payload = {"source": cfg.source, "files": sources.fingerprint(inputs), "text_field": cfg.text_field,
               "val_fraction": cfg.val_fraction, "seed": cfg.seed, "format": _FORMAT}
    if cfg.source == "stdlib":
        payload["python"] = list(sys.version_info[:3])
    return _digest(payload)


def train_texts(inputs: Sequence[sources.Input], opts: pipeline.PrepareOptions,
                flip: int | None) -> Iterator[str]:
    """The training split's documents, streamed (what the BPE learns from)."""
    for doc in sources.iter_documents(inputs, opts.text_field, opts.on_bad_file):
        if pipeline.split_of(doc.ordinal, doc.key, doc.text, doc.split, opts, flip) == "train":
            yield doc.text


def tokenizer_of(cfg, cache_dir: Path, inputs: Sequence[sources.Input], key: str):
    """The given tokenizer, or the BPE trained on this corpus's training split (cached)."""
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer)
    tok_dir = Path(cache_dir) / f"bpe-{_digest([key, cfg.vocab_size])}" / "tokenizer"
    tok = load_cached_tokenizer(tok_dir, cfg.vocab_size)
    if tok is None:
        opts = options_of(cfg)
        tok = bpe.train_bpe(train_texts(inputs, opts, pipeline.plan_flip(inputs, opts)), cfg.vocab_size)
        save_tokenizer(tok, tok_dir, {"vocab_size": cfg.vocab_size, "trained_on": "train split"})
        tok = load_tokenizer(tok_dir)
    return tok


def entry(cfg, cache_dir: str | os.PathLike, splits: Sequence[str]) -> tuple[Path, dict[str, Any], Any]:
    """(directory, index, tokenizer) holding `splits` of `cfg`'s data, prepared if missing."""
    if cfg.source == "dir":
        return open_prepared(Path(cfg.dir), cfg.tokenizer)
    inputs, source = inputs_of(cfg)
    key = corpus_key(cfg, inputs)
    tok = tokenizer_of(cfg, Path(cache_dir), inputs, key)
    where = Path(cache_dir) / _digest([key, shards.tokenizer_hash(tok)])
    index = shards.read_index(where) if where.is_dir() else None
    if index is not None and all(index["splits"][s]["complete"] for s in splits):
        log.info("reusing cached data in %s", where)
    else:
        index = pipeline.prepare_dir(where, inputs, tok, options_of(cfg, splits), source)
    return where, index, tok


def open_prepared(directory: Path, tokenizer: str | None = None) -> tuple[Path, dict[str, Any], Any]:
    """A directory made by `parscale data prepare`: complete, and made with `tokenizer` if one is given."""
    directory = Path(directory)
    index = shards.read_index(directory) if directory.is_dir() else None
    if index is None:
        raise UserError(f"{directory} holds no prepared data (no {shards.INDEX}); make it with "
                                 f"`parscale data prepare --out {directory} ...`")
    if not all(index["splits"][s]["complete"] for s in shards.SPLITS):
        raise UserError(f"the prepare of {directory} did not finish; run the same `parscale data "
                                 "prepare` command again to complete it (it resumes)")
    tok = load_tokenizer(directory / "tokenizer")
    if shards.tokenizer_hash(tok) != index["tokenizer"]["sha256"]:
        raise UserError(f"the tokenizer in {directory / 'tokenizer'} is not the one its index records; "
                                 "the directory was changed after it was prepared; prepare it again")
    if tokenizer is not None:
        pipeline.check_index(index, directory, shards.tokenizer_hash(load_tokenizer(tokenizer)), None)
    log.info("reading prepared data in %s", directory)
    return directory, index, tok


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/parscale/data` (usually ~/.cache/parscale/data): shared by every run,
    evaluation and demo, so a corpus is tokenized once per tokenizer."""
    from parscale.cache import cache_dir

    return cache_dir("data")


def prepare_corpus(cfg, out: str | os.PathLike, workers: int = 0, shard_tokens: int = 1 << 29,
                   on_bad_file: str = "fail") -> dict[str, Any]:
    """`parscale data prepare` from Python: `cfg`'s corpus into the directory `out`; a summary.

    Without a tokenizer, a byte-level BPE is first trained on the training split (streamed);
    a resumed prepare reuses the one saved in `out`.
    """
    inputs, source = inputs_of(cfg)
    opts = pipeline.PrepareOptions(text_field=cfg.text_field, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                   workers=workers, shard_tokens=shard_tokens, on_bad_file=on_bad_file)
    out = Path(out)
    if cfg.tokenizer is not None:
        tok = load_tokenizer(cfg.tokenizer)
    elif (out / shards.INDEX).is_file() and (out / "tokenizer" / "tokenizer.json").is_file():
        tok = load_tokenizer(out / "tokenizer")  # resuming: the BPE trained by the first attempt
    else:
        log.info("training a %d-token byte-level BPE on the training split first", cfg.vocab_size)
        tok = bpe.train_bpe(train_texts(inputs, opts, pipeline.plan_flip(inputs, opts)), cfg.vocab_size)
    index = pipeline.prepare_dir(out, inputs, tok, opts, source)
    return summary(index)


def summary(index: dict[str, Any]) -> dict[str, Any]:
    """Documents, tokens and shards per split, seconds and tokens per second of a prepared directory."""
    splits = {s: {k: index["splits"][s][k] for k in ("docs", "tokens")} | {"shards": len(index["splits"][s]["shards"])}
              for s in shards.SPLITS}
    total = sum(v["tokens"] for v in splits.values())
    return {"splits": splits, "seconds": index["seconds"], "tokens_per_s": total / max(index["seconds"], 1e-9),
            "skipped": index["skipped"], "tokenizer_sha256": index["tokenizer"]["sha256"]}
