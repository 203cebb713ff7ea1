"""Training data: which corpus, which tokenizer, and the packed token arrays, cached.

`prepare_data(DataConfig(...), cache_dir)` gives the train and validation splits as 1-D
token arrays (documents each followed by EOS, concatenated), memory-mapped, plus the
tokenizer. The corpus is streamed into sharded token files (`parscale.data.pipeline`) in a
cache entry keyed by the files' sizes and times, the split options and the tokenizer's
content (`parscale.data.store`), so a changed corpus never reuses a stale entry and the
same corpus is never tokenized twice with the same tokenizer. A directory made by
`parscale data prepare` is read the same way (`DataConfig(dir=...)`). Batching and
evaluation live in `parscale.data.batches` and are re-exported here, so the trainer needs
a single import.

>>> cfg = DataConfig(source="stdlib", vocab_size=2048)       # doctest: +SKIP
>>> data = prepare_data(cfg, cache_dir=Path("run/data"))      # doctest: +SKIP
>>> x = batch_at(data.train, step=0, batch_size=8, seq_len=128)  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parscale.data import corpus, store
from parscale.data.batches import (
    batch_at, check_batch, check_seq_len, check_val, check_vocab_size, evaluate_loss, masked_labels, val_batches,
)
from parscale.data.config import SOURCES, DataConfig  # noqa: F401 (re-exported)
from parscale.errors import UserError
from parscale.progress import progress
from parscale.data.tokenizer import train_bpe  # noqa: F401 (re-exported)

__all__ = [
    "DataConfig", "PreparedData", "prepare_data", "prepare_split", "batch_at", "masked_labels", "val_batches",
    "evaluate_loss", "check_seq_len", "check_vocab_size", "check_batch", "check_val", "check_data", "tokenize_documents",
]

log = logging.getLogger(__name__)

@dataclass
class PreparedData:
    """The packed splits and their tokenizer (`train`, `val`: 1-D integer arrays).

    Chat data (`format="chat"`) also has `train_mask`/`val_mask`: 0/1 arrays beside the
    tokens, 1 where the loss applies (the assistant's tokens); None means every token."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Any
    eos_id: int
    vocab_size: int
    cache_path: Path
    stats: dict[str, Any] = field(default_factory=dict)
    train_mask: np.ndarray | None = None
    val_mask: np.ndarray | None = None


def check_data(data: PreparedData, seq_len: int, batch_size: int) -> None:
    """Every size check the trainer needs before step 0: one batch of train, one sequence of val."""
    check_batch(data.train, batch_size, seq_len, "train")
    fix = None
    if data.stats.get("source") == "dir":  # the split was fixed when the directory was prepared
        fix = (f"prepare {data.cache_path} again into a new directory with a larger "
               "`parscale data prepare --data-val-fraction` (or with --data-val-files)")
    check_val(data.val, seq_len, fix)


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
    with progress(total=len(docs), desc=desc, unit="doc", leave=False) as bar:
        for i in range(0, len(docs), chunk):
            for enc in backend.encode_batch(docs[i:i + chunk], add_special_tokens=False):
                parts.append(np.asarray(enc.ids + [eos], dtype=dtype))
            bar.update(min(chunk, len(docs) - i))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _check_splits(cfg: DataConfig, index: dict, splits: list[str]) -> None:
    if "train" in splits and index["splits"]["train"]["docs"] == 0:
        raise UserError("the training split is empty: every document went to validation; add data files")
    if "val" in splits and index["splits"]["val"]["docs"] == 0:
        raise UserError("the validation split holds no text; give validation files with some text")


def prepare_split(cfg: DataConfig, cache_dir: str | os.PathLike, split: str):
    """(tokens, {"docs", "tokens"}, tokenizer, data directory) of one split, building only what is missing.

    Evaluation with a given tokenizer needs the validation split alone: the training
    split is then never tokenised.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.format == "chat":
        raise UserError("this command scores text data; the held-out loss of chat data is measured by "
                        "`parscale train --data-format chat` (val_loss in metrics.jsonl)")
    where, index, tok = store.entry(cfg, cache_dir, [split])
    _check_splits(cfg, index, [split])
    tokens = store.split_tokens(where, index, split)
    if split == "val" and cfg.val_tokens is not None:
        tokens = tokens[:cfg.val_tokens]
    return tokens, {"docs": index["splits"][split]["docs"], "tokens": int(len(tokens))}, tok, where


def prepare_data(cfg: DataConfig, cache_dir: str | os.PathLike) -> PreparedData:
    """The packed train/validation arrays and tokenizer for `cfg`, built once and cached.

    In a multi-process run, call it on rank 0 first and on the other ranks after a
    barrier: they then read the cache rather than each building it.
    """
    if cfg.format == "chat":
        return _prepare_chat_data(cfg, cache_dir)
    where, index, tok = store.entry(cfg, cache_dir, ["train", "val"])
    _check_splits(cfg, index, ["train", "val"])
    train = store.split_tokens(where, index, "train")
    val = store.split_tokens(where, index, "val")
    if cfg.val_tokens is not None:
        val = val[:cfg.val_tokens]
    if len(train) == 0:
        raise UserError("the training split holds no tokens; give a corpus with text in it")
    stats = {"train_docs": index["splits"]["train"]["docs"], "train_tokens": int(len(train)),
             "val_docs": index["splits"]["val"]["docs"], "val_tokens": int(len(val)), "source": cfg.source}
    log.info("data: %d train tokens (%d docs), %d val tokens (%d docs), vocab %d",
             len(train), stats["train_docs"], len(val), stats["val_docs"], len(tok))
    return PreparedData(train=train, val=val, tokenizer=tok, eos_id=int(tok.eos_token_id),
                        vocab_size=len(tok), cache_path=where, stats=stats)


def _prepare_chat_data(cfg: DataConfig, cache_dir: str | os.PathLike) -> PreparedData:
    """Conversations packed like documents, with the assistant-token masks (see `parscale.data.chat`)."""
    from parscale.data.chat import prepare_chat

    arrays, stats, tok, where = prepare_chat(cfg, cache_dir)
    val, val_mask = arrays["val"], arrays["val_mask"]
    if cfg.val_tokens is not None:
        val, val_mask = val[:cfg.val_tokens], val_mask[:cfg.val_tokens]
        if not np.any(val_mask[1:]):
            raise UserError(f"the first {cfg.val_tokens} validation tokens hold no assistant token to score; "
                            "raise --data-val-tokens")
    stats = {**stats, "train_tokens": int(len(arrays["train"])), "val_tokens": int(len(val))}
    log.info("chat data: %d train tokens (%d conversations, %d in the loss), %d val tokens (%d conversations)",
             stats["train_tokens"], stats["train_docs"], stats["train_targets"], len(val), stats["val_docs"])
    return PreparedData(train=arrays["train"], val=val, tokenizer=tok, eos_id=int(tok.eos_token_id),
                        vocab_size=len(tok), cache_path=where, stats=stats,
                        train_mask=arrays["train_mask"], val_mask=val_mask)
