"""Training data: which corpus, which tokenizer, and the packed token arrays, cached.

`prepare_data(DataConfig(...), cache_dir)` gives the train and validation splits as 1-D
token arrays (documents each followed by EOS, concatenated) plus the tokenizer. The
result is cached under `cache_dir/<key>/`, where the key hashes everything the arrays
depend on (the config and the files' sizes and times), so a changed config or corpus
never reuses a stale cache. Batching and evaluation live in `parscale.data.batches` and are
re-exported here, so the trainer needs a single import.

>>> cfg = DataConfig(source="stdlib", vocab_size=2048)       # doctest: +SKIP
>>> data = prepare_data(cfg, cache_dir=Path("run/data"))      # doctest: +SKIP
>>> x = batch_at(data.train, step=0, batch_size=8, seq_len=128)  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from parscale.data import corpus
from parscale.data.batches import (
    batch_at, check_batch, check_seq_len, check_val, check_vocab_size, evaluate_loss, val_batches,
)
from parscale.errors import UserError, reject_unknown_fields
from parscale.data.tokenizer import load_cached_tokenizer, load_tokenizer, save_tokenizer, train_bpe
from parscale.atomic import atomic_write, atomic_write_json

__all__ = [
    "DataConfig", "PreparedData", "prepare_data", "prepare_split", "batch_at", "val_batches", "evaluate_loss",
    "check_seq_len", "check_vocab_size", "check_batch", "check_val", "check_data", "tokenize_documents",
]

log = logging.getLogger(__name__)

SOURCES = ("stdlib", "files")
_CACHE_FORMAT = 1  # bump when the cached layout or the tokenisation changes
_TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece")


@dataclass(frozen=True)
class DataConfig:
    """What to train on and how to tokenise it.

    Args:
        source: "stdlib" (the Python standard library's own sources) or "files";
            None (the default) means "files" when files are given, else "stdlib".
        files: local data files or directories (source "files"): text files are one
            document each; JSON/JSONL and parquet one document per row.
        text_field: the JSON/parquet field holding the text.
        val_files: separate validation files; when empty, a stable hash of each document
            (of each file's relative path for the stdlib) sends `val_fraction` of them to validation.
        val_fraction: the share of documents held out when no `val_files` are given.
        tokenizer: None to train a byte-level BPE on the training split, else a local
            tokenizer directory.
        vocab_size: the BPE's vocabulary size (ignored with a given tokenizer).
        val_tokens: validation keeps its first `val_tokens` tokens (None: all).
        seed: salts the train/validation split hash. Keep it fixed across runs you want to
            compare (the training seed goes to `batch_at`, not here).
    """

    source: str | None = None
    files: tuple[str, ...] = ()
    text_field: str = "text"
    val_files: tuple[str, ...] = ()
    val_fraction: float = 0.02
    tokenizer: str | None = None
    vocab_size: int = 2048
    val_tokens: int | None = 131072
    seed: int = 0

    def __post_init__(self) -> None:
        # Paths become absolute strings, so the config means the same after a `cd` or a resume.
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("files", "val_files"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, (str, os.PathLike)) else value
            set_(name, tuple(_abspath(v) for v in value))
        if self.tokenizer is not None:
            set_("tokenizer", _abspath(self.tokenizer))
        if self.source is None:
            set_("source", "files" if self.files else "stdlib")
        if self.source not in SOURCES:
            raise UserError(f"unknown data source {self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.source == "files" and not self.files:
            raise UserError("data source 'files' needs at least one file (--data-files in train, --data in eval)")
        if self.source == "stdlib" and (self.files or self.val_files):
            raise UserError("the stdlib corpus takes no data files; drop the files, or drop source 'stdlib' "
                            "to train on the files")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if not self.text_field:
            raise UserError("text_field must name the field holding the text, e.g. 'text'")
        if self.vocab_size < 257:
            raise UserError(f"vocab_size {self.vocab_size} is too small for a byte-level BPE; use at least 257")
        if self.val_tokens is not None and self.val_tokens < 2:
            raise UserError(f"val_tokens must be at least 2 (or None for all), got {self.val_tokens}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        reject_unknown_fields(cls, d, "data option(s)")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _abspath(p: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(p)))


@dataclass
class PreparedData:
    """The packed splits and their tokenizer (`train`, `val`: 1-D integer arrays)."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Any
    eos_id: int
    vocab_size: int
    cache_path: Path
    stats: dict[str, Any] = field(default_factory=dict)


def check_data(data: PreparedData, seq_len: int, batch_size: int) -> None:
    """Every size check the trainer needs before step 0: one batch of train, one sequence of val."""
    check_batch(data.train, batch_size, seq_len, "train")
    check_val(data.val, seq_len)


def data_key(cfg: DataConfig) -> str:
    """A hash of everything the cached arrays depend on (not `val_tokens`: applied at load)."""
    if cfg.source == "stdlib":
        sources: Any = {"stdlib": corpus.fingerprint(corpus.stdlib_files()), "python": sys.version_info[:3]}
    else:
        sources = {"files": corpus.fingerprint(corpus.check_files(cfg.files)),
                   "val_files": corpus.fingerprint(corpus.check_files(cfg.val_files, "validation file"))}
    cfg_dict = cfg.to_dict()
    if cfg.tokenizer is not None:
        # The tokenizer counts by content, not place: the same tokenizer saved beside two
        # checkpoints shares one cache entry, and the checkpoint's weights do not matter.
        cfg_dict["tokenizer"] = _tokenizer_digest(Path(cfg.tokenizer))
    payload = {**cfg_dict, "val_tokens": None, "sources": sources, "format": _CACHE_FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer_digest(tok_dir: Path) -> str:
    if not tok_dir.is_dir():
        raise UserError(f"the tokenizer directory {tok_dir} does not exist; give a local directory "
                        "holding tokenizer.json (nothing is downloaded)")
    digest = hashlib.sha256()
    for path in sorted(tok_dir.iterdir()):
        if path.is_file() and path.name.startswith(_TOKENIZER_FILE_PREFIXES):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def split_documents(cfg: DataConfig, hf_cache: Path | None = None) -> tuple[list[str], list[str]]:
    """(train documents, validation documents) for `cfg`, each in a deterministic order."""
    if cfg.source == "stdlib":
        named = corpus.read_stdlib_documents(corpus.stdlib_files())
        if not named:
            raise UserError("no readable .py files found in the Python standard library; "
                            "give your own files (--data-files in train, --data in eval)")
        is_val = corpus.split_keys([name for name, _ in named], cfg.val_fraction, cfg.seed)
        docs = [text for _, text in named]
    else:
        docs = corpus.load_documents(cfg.files, cfg.text_field, hf_cache)
        if cfg.val_files:
            corpus.check_disjoint(cfg.files, cfg.val_files)
            return docs, corpus.load_documents(cfg.val_files, cfg.text_field, hf_cache)
        is_val = corpus.split_keys(docs, cfg.val_fraction, cfg.seed)  # keyed by content: duplicates stay together
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


def tokenize_documents(docs: list[str], tokenizer, desc: str = "tokenizing", chunk: int = 64) -> np.ndarray:
    """Pack documents into one array: the ids of each document followed by EOS.

    Special tokens of the tokenizer's template (a BOS, say) are not added: EOS alone
    separates documents, the same whatever tokenizer is used.
    """
    eos = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    backend = tokenizer.backend_tokenizer
    parts: list[np.ndarray] = []
    with tqdm(total=len(docs), desc=desc, unit="doc", leave=False) as bar:
        for i in range(0, len(docs), chunk):
            for enc in backend.encode_batch(docs[i:i + chunk], add_special_tokens=False):
                parts.append(np.asarray(enc.ids + [eos], dtype=dtype))
            bar.update(min(chunk, len(docs) - i))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    atomic_write(path, write)


def _save_json(path: Path, obj: dict) -> None:
    atomic_write_json(path, obj, indent=1, sort_keys=True)


def _tokenizer(cfg: DataConfig, where: Path, train_docs: list[str]):
    """The cached tokenizer in `where/tokenizer`, made first if missing (trained or copied)."""
    tok_dir = where / "tokenizer"
    if cfg.tokenizer is None:
        tok = load_cached_tokenizer(tok_dir, cfg.vocab_size)
        if tok is None:
            tok = train_bpe(train_docs, cfg.vocab_size)  # the training split only: validation stays unseen
            save_tokenizer(tok, tok_dir, {"vocab_size": cfg.vocab_size, "trained_on": "train split"})
    elif not (tok_dir / "tokenizer.json").is_file():
        tok = load_tokenizer(cfg.tokenizer)
        save_tokenizer(tok, tok_dir, {"vocab_size": len(tok), "copied_from": cfg.tokenizer})
    return load_tokenizer(tok_dir)


def _build(cfg: DataConfig, where: Path, splits: list[str]) -> None:
    """Read and split the documents, then tokenise and cache the `splits` not yet cached."""
    train_docs, val_docs = split_documents(cfg, where.parent / "hf_datasets")
    if not train_docs:
        raise UserError("the training split is empty: every document went to validation; add data files")
    if not val_docs:
        raise UserError("the validation files hold no text; give validation files with some text")
    tok = _tokenizer(cfg, where, train_docs)
    for split in splits:
        docs = train_docs if split == "train" else val_docs
        tokens = tokenize_documents(docs, tok, f"tokenizing {split}")
        _save_npy(where / f"{split}.npy", tokens)
        _save_json(where / f"{split}.json", {"docs": len(docs), "tokens": int(len(tokens)),
                                              "config": cfg.to_dict(), "format": _CACHE_FORMAT})


def prepare_split(cfg: DataConfig, cache_dir: str | os.PathLike, split: str, key: str | None = None):
    """(tokens, {"docs", "tokens"}, tokenizer, cache path) of one split, building only what is missing.

    Evaluation with a given tokenizer needs the validation split alone: the training
    split is then never tokenised.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    where = Path(cache_dir) / (key or data_key(cfg))
    ready = (where / f"{split}.json").is_file() and (where / "tokenizer" / "tokenizer.json").is_file()
    if ready:
        log.info("reusing cached %s data in %s", split, where)
    else:
        where.mkdir(parents=True, exist_ok=True)
        _build(cfg, where, [split])
    info = json.loads((where / f"{split}.json").read_text())  # written after its .npy: marks it complete
    tokens = np.load(where / f"{split}.npy", mmap_mode="r")
    if split == "val" and cfg.val_tokens is not None:
        tokens = tokens[:cfg.val_tokens]
    return tokens, {"docs": info["docs"], "tokens": int(len(tokens))}, load_tokenizer(where / "tokenizer"), where


def prepare_data(cfg: DataConfig, cache_dir: str | os.PathLike) -> PreparedData:
    """The packed train/validation arrays and tokenizer for `cfg`, built once and cached.

    In a multi-process run, call it on rank 0 first and on the other ranks after a
    barrier: they then read the cache rather than each building it.
    """
    key = data_key(cfg)
    where = Path(cache_dir) / key
    missing = [s for s in ("train", "val") if not (where / f"{s}.json").is_file()]
    if missing or not (where / "tokenizer" / "tokenizer.json").is_file():
        where.mkdir(parents=True, exist_ok=True)
        _build(cfg, where, missing or ["train", "val"])
    train, train_info, tok, _ = prepare_split(cfg, cache_dir, "train", key)
    val, val_info, _, _ = prepare_split(cfg, cache_dir, "val", key)
    if len(train) == 0:
        raise UserError("the training split holds no tokens; give a corpus with text in it")
    stats = {"train_docs": train_info["docs"], "train_tokens": train_info["tokens"],
             "val_docs": val_info["docs"], "val_tokens": val_info["tokens"]}
    log.info("data: %d train tokens (%d docs), %d val tokens (%d docs), vocab %d",
             len(train), stats["train_docs"], len(val), stats["val_docs"], len(tok))
    return PreparedData(train=train, val=val, tokenizer=tok, eos_id=int(tok.eos_token_id),
                        vocab_size=len(tok), cache_path=where, stats=stats)
