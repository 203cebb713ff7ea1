"""A prepared data directory: sharded token files, memory-mapped, and the index that trusts them.

    DATA_DIR/
      index.json          the truth: shards and their token counts, the tokenizer's content
                          hash, the input files and their sizes, where an unfinished prepare stands
      tokenizer/          the tokenizer the tokens were made with
      train-00000.bin     raw token ids (uint16 when the vocabulary fits, else uint32), the
      train-00001.bin     documents of the split each followed by EOS, concatenated;
      val-00000.bin       a shard ends at a document boundary

A shard is written under a temporary name, flushed to disk and renamed; only then does the
index (itself written atomically) list it. A file the index does not list is never read, so
a killed or disk-full prepare leaves the last complete shard trusted and nothing half-written.

Raw `.bin` files rather than `.npy`: a shard grows while it is written, and a header that
must know the final length would have to be rewritten; the index already holds the dtype
and the count, and the file size is checked against them when it is opened.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parscale.atomic import atomic_write_json
from parscale.errors import UserError

INDEX = "index.json"
FORMAT = 1
SPLITS = ("train", "val")


def tokenizer_hash(tok) -> str:
    """The tokenizer's content: what decides the tokens (its tokenizers JSON and the EOS id),
    not the files it came from, so the same tokenizer saved twice hashes the same."""
    digest = hashlib.sha256(tok.backend_tokenizer.to_str().encode())
    digest.update(f"\0eos={tok.eos_token_id}".encode())
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.bin"


def read_index(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a readable data index ({err}); prepare the data again "
                        "into a new directory") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{path} is not a parscale data index of format {FORMAT}; prepare the data again")
    return index


def write_index(directory: Path, index: dict[str, Any]) -> None:
    atomic_write_json(Path(directory) / INDEX, index, indent=1)


def remove_untrusted(directory: Path, index: dict[str, Any] | None) -> list[str]:
    """Delete shard and temporary files that the index does not list (a killed prepare's)."""
    trusted = {s["file"] for split in (index or {}).get("splits", {}).values() for s in split["shards"]}
    removed = []
    for path in Path(directory).iterdir():
        name = path.name
        is_shard = name.endswith(".bin") and name.split("-")[0] in SPLITS
        if path.is_file() and ((is_shard and name not in trusted) or name.endswith(".bin.tmp")):
            path.unlink()
            removed.append(name)
    return removed


class ShardWriter:
    """Appends one split's tokens to numbered shards; `close()` makes the current one final.

    The caller decides when to close (at a document boundary), then records the returned
    entry in the index: until then the shard is a temporary file no reader trusts.
    """

    def __init__(self, directory: Path, split: str, dtype: np.dtype, first_number: int):
        self.directory, self.split, self.dtype = Path(directory), split, np.dtype(dtype)
        self.number = first_number
        self.tokens = self.docs = 0
        self._fh = None

    def _tmp(self) -> Path:
        return self.directory / (shard_name(self.split, self.number) + ".tmp")

    def write(self, tokens: np.ndarray, docs: int) -> None:
        if self._fh is None:
            self._fh = open(self._tmp(), "wb", buffering=1 << 20)  # noqa: SIM115 - open until close()
        self._fh.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.tokens += len(tokens)
        self.docs += docs

    def close(self) -> dict[str, Any] | None:
        """Flush, fsync and rename the current shard; its index entry (None if empty)."""
        if self._fh is None:
            return None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        name = shard_name(self.split, self.number)
        os.replace(self._tmp(), self.directory / name)
        entry = {"file": name, "tokens": self.tokens, "docs": self.docs}
        self.number += 1
        self.tokens = self.docs = 0
        return entry

    def abort(self) -> None:
        """Drop the unfinished shard (the index never listed it)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._tmp().unlink(missing_ok=True)


class ShardedTokens:
    """Consecutive memory-mapped shards read as one 1-D array: `len`, slices, `np.asarray`.

    A slice is a lazy view (nothing is read until `np.asarray`), so `tokens[:n]` of a corpus
    of billions of tokens costs nothing; `batch_at` and `val_batches` see the same tokens as
    they would in one concatenated array, so batches cross shard boundaries transparently.
    """

    def __init__(self, parts: Sequence[np.ndarray], start: int = 0, stop: int | None = None):
        self._parts = list(parts)
        self._bounds = np.cumsum([0] + [len(p) for p in self._parts])
        self._start, self._stop = start, int(self._bounds[-1]) if stop is None else stop
        self.dtype = self._parts[0].dtype if self._parts else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self._stop - self._start

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def ndim(self) -> int:
        return 1

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("sharded tokens support contiguous slices only")
            return ShardedTokens(self._parts, self._start + start, self._start + max(stop, start))
        index = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"index {key} is out of range for {len(self)} tokens")
        return self._gather(self._start + index, self._start + index + 1)[0]

    def _gather(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self._bounds, start, side="right")) - 1
        pieces = []
        while start < stop:
            base = int(self._bounds[first])
            take = min(stop, int(self._bounds[first + 1])) - start
            pieces.append(self._parts[first][start - base:start - base + take])
            start += take
            first += 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._gather(self._start, self._stop)
        return np.asarray(out, dtype=dtype) if dtype is not None else np.asarray(out)


def split_tokens(directory: Path, index: dict[str, Any], split: str):
    """The split's tokens, memory-mapped: one shard as a plain memmap, several as one view."""
    directory = Path(directory)
    dtype = np.dtype(index["tokenizer"]["dtype"])
    parts = []
    for shard in index["splits"][split]["shards"]:
        path = directory / shard["file"]
        want = shard["tokens"] * dtype.itemsize
        size = path.stat().st_size if path.is_file() else -1
        if size != want:
            raise UserError(f"the shard {path} has {size} bytes where the index says {want}: the data "
                            "directory was changed after it was prepared; prepare it again")
        if shard["tokens"]:
            parts.append(np.memmap(path, dtype=dtype, mode="r"))
    if not parts:
        return np.zeros(0, dtype=dtype)
    return parts[0] if len(parts) == 1 else ShardedTokens(parts)
