"""`DataConfig`: what to train on and how to tokenise it (no heavy imports).

Kept apart from `prepare`, which imports numpy and torch, so that reading or validating a
config (`parscale train --help`, a YAML file) costs nothing.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from parscale.errors import UserError, reject_unknown_fields

SOURCES = ("stdlib", "files", "dir")
FORMATS = ("text", "chat")


@dataclass(frozen=True)
class DataConfig:
    """What to train on and how to tokenise it.

    Args:
        source: "stdlib" (the Python standard library's own sources), "files", or "dir"
            (a directory made by `parscale data prepare`); None (the default) means "dir"
            when `dir` is given, "files" when files are given, else "stdlib".
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
        dir: a prepared data directory (sharded tokens and their index) to train from; its
            tokenizer is used, and a different `tokenizer` is refused.
        format: "text" (documents; the loss is on every token) or "chat" (JSON Lines, one
            {"messages": [{"role": ..., "content": ...}, ...]} per line, rendered with the
            tokenizer's chat template, the loss on the assistant turns only; needs `tokenizer`,
            which --init-from provides).
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
    dir: str | None = None
    format: str = "text"

    def __post_init__(self) -> None:
        # Paths become absolute strings, so the config means the same after a `cd` or a resume.
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("files", "val_files"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, (str, os.PathLike)) else value
            set_(name, tuple(_abspath(v) for v in value))
        for name in ("tokenizer", "dir"):
            if getattr(self, name) is not None:
                set_(name, _abspath(getattr(self, name)))
        if self.source is None:
            set_("source", "dir" if self.dir else "files" if self.files else "stdlib")
        if self.source not in SOURCES:
            raise UserError(f"unknown data source {self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.source == "files" and not self.files:
            raise UserError("data source 'files' needs at least one file (--data-files in train, --data in eval)")
        if self.source == "stdlib" and (self.files or self.val_files):
            raise UserError("the stdlib corpus takes no data files; drop the files, or drop source 'stdlib' "
                            "to train on the files")
        if (self.source == "dir") != bool(self.dir):
            raise UserError("a prepared data directory goes with source 'dir' alone: give --data-dir DIR "
                            "without --data-source")
        if self.dir and (self.files or self.val_files):
            raise UserError("--data-dir reads data prepared from files already; drop --data-files/--data-val-files")
        if self.format not in FORMATS:
            raise UserError(f"unknown data format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.format == "chat" and self.source != "files":
            raise UserError("--data-format chat reads JSON Lines conversations: give them with --data-files")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if not self.text_field:
            raise UserError("text_field must name the field holding the text, e.g. 'text'")
        if self.vocab_size < 257:
            raise UserError(f"vocab_size {self.vocab_size} is too small for a byte-level BPE; use at least 257")
        if self.val_tokens is not None and self.val_tokens < 2:
            raise UserError(f"val_tokens must be at least 2 (or None for all), got {self.val_tokens}")

    def check_chat_tokenizer_given(self) -> None:
        """Chat data needs a tokenizer with a chat template; a BPE trained here has none."""
        if self.format == "chat" and self.tokenizer is None:
            raise UserError("--data-format chat needs a tokenizer with a chat template (a trained BPE has none): "
                            "give its directory with --data-tokenizer, or start from a model with --init-from")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        reject_unknown_fields(cls, d, "data option(s)")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _abspath(p: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(p)))
