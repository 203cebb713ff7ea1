"""Prepare a corpus of any size: stream documents, tokenize in worker processes, write shards.

    index = prepare_dir("data/web", file_inputs(["web/"]), tokenizer, PrepareOptions(workers=2))

Memory stays bounded whatever the corpus: this process reads one document at a time and
keeps at most `2 x workers` chunks of about a megabyte of text in flight; tokens go straight
to the open shard file. `multiprocessing.Pool.imap` would read the whole input ahead (its
feeder thread does not wait), hence the explicit window of pending results below.

The split is today's: a document goes to validation when the stable hash of its key (its
content, or the relative path for the standard library) falls below `val_fraction`. When a
small corpus would leave one side empty, the one document `corpus.split_keys` would move is
moved here too (a pre-pass finds it; it stops as soon as both sides have a document).

Every `shard_tokens` tokens the open shards are closed and the index records them with the
input position after their last document: that is a commit. An interrupted prepare
continues from the last commit; anything written after it is deleted as untrusted.
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import fcntl
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parscale.data import corpus, shards
from parscale.data.sources import Cursor, Doc, Input, fingerprint, iter_documents
from parscale.errors import UserError
from parscale.progress import progress

log = logging.getLogger(__name__)

KILL_AFTER_COMMITS_ENV = "PARSCALE_KILL_AFTER_COMMITS"  # fault injection for the resume tests
_CHUNK_CHARS = 1 << 20  # text per task sent to a worker: large enough to amortise the hand-over
_CHUNK_DOCS = 2048


@dataclass(frozen=True)
class PrepareOptions:
    """How to read and split the inputs, and how to write them.

    Args:
        text_field: the JSON/parquet field holding the text.
        val_fraction: the share of documents (by hash) held out, when there are no validation files.
        seed: salts the split hash (`--data-seed`).
        workers: tokenizing processes; 0 tokenizes in this process (no start-up cost, for small data).
        shard_tokens: a shard is closed at the first document boundary past this many tokens.
        on_bad_file: "fail" (default) or "skip" an unreadable or non-UTF-8 file (or JSON line).
        splits: which splits to write ("val" alone suits an evaluation).
    """

    text_field: str = "text"
    val_fraction: float = 0.02
    seed: int = 0
    workers: int = 0
    shard_tokens: int = 1 << 29  # 1 GiB of uint16 tokens
    on_bad_file: str = "fail"
    splits: tuple[str, ...] = shards.SPLITS

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise UserError(f"--workers must be 0 (this process) or more, got {self.workers}")
        if self.shard_tokens < 1:
            raise UserError(f"--shard-tokens must be at least 1, got {self.shard_tokens}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")


# ---------------------------------------------------------------- the split
def plan_flip(inputs: Sequence[Input], opts: PrepareOptions) -> int | None:
    """The ordinal of the one document whose side `corpus.split_keys` would flip, or None."""
    if any(i.split is not None for i in inputs):
        return None  # separate validation files: no hash split
    lo = hi = None  # (unit, ordinal) of the lowest and highest hash seen
    seen_val = seen_train = False
    count = 0
    for doc in iter_documents(inputs, opts.text_field, opts.on_bad_file):
        unit = corpus.stable_unit(doc.key if doc.key is not None else doc.text, opts.seed)
        seen_val, seen_train = seen_val or unit < opts.val_fraction, seen_train or unit >= opts.val_fraction
        if seen_val and seen_train:
            return None
        lo = (unit, doc.ordinal) if lo is None or unit < lo[0] else lo
        hi = (unit, doc.ordinal) if hi is None or unit > hi[0] else hi
        count += 1
    if count == 0:
        raise UserError(f"the data files ({len(inputs)}) hold no text (all documents are empty)")
    if count == 1:
        corpus.split_keys(["one"], opts.val_fraction, opts.seed)  # its error: too few documents
    return lo[1] if not seen_val else hi[1]


def split_of(ordinal: int, key: str | None, text: str, forced: str | None, opts: PrepareOptions,
             flip: int | None) -> str:
    """"train" or "val": forced by validation files, else by the hash of the key (or the text)."""
    if forced is not None:
        return forced
    is_val = corpus.stable_unit(key if key is not None else text, opts.seed) < opts.val_fraction
    return "val" if is_val != (ordinal == flip) else "train"


# ---------------------------------------------------------------- the workers
_STATE: dict[str, Any] = {}  # a worker process's tokenizer and options, set once by its initializer


def _init_worker(tok_json: str, eos: int, dtype: str, opts: PrepareOptions, flip: int | None) -> None:
    """Each worker encodes on one thread: the processes are the parallelism."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    from tokenizers import Tokenizer

    _set_state(Tokenizer.from_str(tok_json), eos, dtype, opts, flip)


def _set_state(backend, eos: int, dtype: str, opts: PrepareOptions, flip: int | None,
               state: dict | None = None) -> dict:
    state = _STATE if state is None else state
    state.update(tok=backend, eos=eos, dtype=np.dtype(dtype), opts=opts, flip=flip)
    return state


def tokenize_chunk(items: list[tuple[int, str | None, str, str | None]],
                   state: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, lengths, split codes) of a chunk's documents, in order: each document's ids
    and its EOS back to back; code i is `shards.SPLITS[i]`, -1 for a split not written."""
    state = _STATE if state is None else state
    opts, eos, dtype = state["opts"], state["eos"], state["dtype"]
    codes = np.full(len(items), -1, dtype=np.int8)
    texts = []
    for i, (ordinal, key, text, forced) in enumerate(items):
        split = split_of(ordinal, key, text, forced, opts, state["flip"])
        if split in opts.splits:
            codes[i] = shards.SPLITS.index(split)
            texts.append(text)
    encode = getattr(state["tok"], "encode_batch_fast", state["tok"].encode_batch)  # fast: no offsets
    ids = [enc.ids for enc in encode(texts, add_special_tokens=False)] if texts else []
    lengths = np.zeros(len(items), dtype=np.int64)
    lengths[codes >= 0] = [len(row) + 1 for row in ids]
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for row in ids:  # (n_i,) ids then EOS, packed back to back
        flat[pos:pos + len(row)] = row
        flat[pos + len(row)] = eos
        pos += len(row) + 1
    return flat, lengths, codes


def _chunks(docs: Iterator[Doc]) -> Iterator[tuple[list, list[Cursor]]]:
    items, cursors, chars = [], [], 0
    for doc in docs:
        items.append((doc.ordinal, doc.key, doc.text, doc.split))
        cursors.append(doc.after)
        chars += len(doc.text)
        if chars >= _CHUNK_CHARS or len(items) >= _CHUNK_DOCS:
            yield items, cursors
            items, cursors, chars = [], [], 0
    if items:
        yield items, cursors


def _results(chunks: Iterator[tuple[list, list[Cursor]]], workers: int, init_args: tuple,
             backend) -> Iterator[tuple[tuple, list[Cursor]]]:
    """Tokenized chunks in input order, at most 2 x workers in flight."""
    if workers == 0:  # here, with the tokenizer's own threads
        state = _set_state(backend, *init_args[1:], state={})
        for items, cursor in chunks:
            yield tokenize_chunk(items, state), cursor
        return
    # Fork starts fast and re-imports nothing, but a process holding torch's thread pools must
    # not fork; spawn then (which re-imports the caller's main module: scripts need a main guard).
    fork = "fork" in multiprocessing.get_all_start_methods() and "torch" not in sys.modules
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=init_args)
    try:
        pending: collections.deque = collections.deque()
        for items, cursor in chunks:
            pending.append((pool.apply_async(tokenize_chunk, (items,)), cursor))
            if len(pending) >= 2 * workers:
                result, at = pending.popleft()
                yield result.get(), at
        while pending:
            result, at = pending.popleft()
            yield result.get(), at
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ---------------------------------------------------------------- the directory
def _lock(directory: Path):
    fh = open(directory / ".lock", "a")  # noqa: SIM115 - held for the whole prepare
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("waiting for another process preparing %s", directory)
        fcntl.flock(fh, fcntl.LOCK_EX)
    return fh


def _new_index(tok, tok_hash: str, inputs_record: dict) -> dict[str, Any]:
    return {"format": shards.FORMAT,
            "tokenizer": {"sha256": tok_hash, "vocab_size": len(tok), "eos_id": int(tok.eos_token_id),
                          "dtype": shards.token_dtype(len(tok)).name},
            "inputs": inputs_record,
            "splits": {s: {"shards": [], "docs": 0, "tokens": 0, "complete": False} for s in shards.SPLITS},
            "pass": None, "cursor": None, "skipped": [], "seconds": 0.0}


# The option of `parscale data prepare` (and `parscale train`) behind each field of the inputs record.
_OPTION_OF = {"text_field": "--data-text-field", "val_fraction": "--data-val-fraction", "seed": "--data-seed"}


def check_index(index: dict, directory: Path, tok_hash: str | None, inputs_record: dict | None) -> None:
    """Refuse a directory made with another tokenizer or from other (or changed) inputs, naming
    what differs: the option and both values, or the files."""
    have = index["tokenizer"]["sha256"]
    if tok_hash is not None and have != tok_hash:
        raise UserError(f"{directory} was prepared with another tokenizer (content hash {have[:12]}) than "
                        f"the one given ({tok_hash[:12]}); use the tokenizer in {directory / 'tokenizer'} "
                        "(--data-tokenizer), or prepare the data again into another directory")
    if inputs_record is not None and index["inputs"] != inputs_record:
        raise UserError(f"{directory} was prepared with other inputs: {_differences(index['inputs'], inputs_record)}; "
                        "give the same options again to reuse or resume it, or use another --out (or delete it "
                        "to start again)")


def _differences(then: dict, now: dict) -> str:
    """What differs between two inputs records, in the user's terms."""
    found = [f"{flag} was {then.get(key)!r}, now {now.get(key)!r}" for key, flag in _OPTION_OF.items()
             if then.get(key) != now.get(key)]
    files_then, files_now = then.get("files") or [], now.get("files") or []
    if then.get("source") != now.get("source") or [(f[0], f[-1]) for f in files_then] != [(f[0], f[-1]) for f in files_now]:
        found.append("--data-files/--data-val-files name other files"
                     if then.get("source") == now.get("source") else
                     f"the data were {then.get('source')!r}, now {now.get('source')!r} (--data-files)")
    else:
        changed = [f[0] for f, g in zip(files_then, files_now) if f != g]
        if changed:
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            found.append(f"files changed since (their sizes or times differ): {shown}")
    return "; ".join(found) or "the record differs"


def _start_pass(directory: Path, index: dict, needed: list[str]) -> Cursor:
    """Continue the interrupted pass if it wrote the same splits; else start one from the top."""
    if index["pass"] == needed and index["cursor"] is not None:
        cursor = Cursor(**index["cursor"])
        done = sum(index["splits"][s]["tokens"] for s in needed)
        log.info("resuming the prepare of %s after %d documents (%d tokens kept)", directory, cursor.ordinal, done)
    else:
        cursor = Cursor()
        for s in needed:
            index["splits"][s] = {"shards": [], "docs": 0, "tokens": 0, "complete": False}
        index.update({"pass": needed, "cursor": cursor.to_dict()})
    removed = shards.remove_untrusted(directory, index)
    if removed:
        log.info("removed %d shard file(s) an interrupted prepare left unfinished", len(removed))
    shards.write_index(directory, index)
    return cursor


def prepare_dir(directory: str | os.PathLike, inputs: Sequence[Input], tok, opts: PrepareOptions,
                source: str = "files") -> dict[str, Any]:
    """Tokenize `inputs` into shards under `directory` (resuming an interrupted prepare); the index.

    `tok` is a transformers fast tokenizer with an EOS token. A directory prepared with
    another tokenizer, or from other inputs, is refused; a complete one is returned as is.
    """
    from parscale.data.tokenizer import save_tokenizer

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file; give a directory for the prepared data")
    if directory.is_dir() and shards.read_index(directory) is None and any(
            p.name != ".lock" for p in directory.iterdir()):
        raise UserError(f"{directory} is not empty and holds no {shards.INDEX}; give a new or empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    tok_hash = shards.tokenizer_hash(tok)
    inputs_record = {"source": source, "files": fingerprint(inputs), "text_field": opts.text_field,
                     "val_fraction": opts.val_fraction, "seed": opts.seed}
    with _lock(directory):
        index = shards.read_index(directory) or _new_index(tok, tok_hash, inputs_record)
        check_index(index, directory, tok_hash, inputs_record)
        needed = [s for s in opts.splits if not index["splits"][s]["complete"]]
        if not needed:
            return index
        cursor = _start_pass(directory, index, needed)  # writes the index first: the directory is ours
        if not (directory / "tokenizer" / "tokenizer.json").is_file():
            save_tokenizer(tok, directory / "tokenizer", {"sha256": tok_hash, "vocab_size": len(tok)})
        flip = plan_flip(inputs, opts)
        run = _Pass(directory, index, inputs, tok, dataclasses.replace(opts, splits=tuple(needed)), flip)
        run.run(cursor)
    return index


class _Pass:
    """One pass over the inputs: tokens into shards, a commit every `shard_tokens`."""

    def __init__(self, directory: Path, index: dict, inputs: Sequence[Input], tok, opts: PrepareOptions,
                 flip: int | None):
        self.directory, self.index, self.inputs, self.opts, self.flip = directory, index, inputs, opts, flip
        self.tok = tok
        dtype = np.dtype(index["tokenizer"]["dtype"])
        self.writers = {s: shards.ShardWriter(directory, s, dtype, len(index["splits"][s]["shards"]))
                        for s in opts.splits}
        self.sizes = np.cumsum([0] + [i.path.stat().st_size for i in inputs])
        self.commits = 0

    def _progress(self, cursor: Cursor) -> int:
        """Input bytes behind `cursor` (exact for plain JSON Lines, file by file otherwise)."""
        done = int(self.sizes[min(cursor.file, len(self.inputs))])
        if cursor.file < len(self.inputs) and corpus.file_kind(self.inputs[cursor.file].path) == "json":
            done += min(cursor.offset, int(self.sizes[cursor.file + 1]) - done)
        return done

    def run(self, cursor: Cursor) -> None:
        t0, tokens = time.perf_counter(), 0
        seconds0 = self.index["seconds"]
        docs = iter_documents(self.inputs, self.opts.text_field, self.opts.on_bad_file, cursor, self.index["skipped"])
        backend = self.tok.backend_tokenizer
        eos, dtype = int(self.tok.eos_token_id), self.index["tokenizer"]["dtype"]
        init = (backend.to_str() if self.opts.workers else "", eos, dtype, self.opts, self.flip)
        kill_after = os.environ.get(KILL_AFTER_COMMITS_ENV)
        bar = progress(total=int(self.sizes[-1]), initial=self._progress(cursor), unit="B", unit_scale=True,
                       desc=f"preparing {self.directory.name}", leave=False)
        try:
            with bar:
                for (flat, lengths, codes), cursors in _results(_chunks(docs), self.opts.workers, init, backend):
                    pos = 0
                    for n, code, at in zip(lengths.tolist(), codes.tolist(), cursors):
                        if code < 0:
                            continue
                        writer = self.writers[shards.SPLITS[code]]
                        writer.write(flat[pos:pos + n], 1)
                        pos += n
                        if writer.tokens >= self.opts.shard_tokens:  # a commit, at a document boundary
                            self._commit(at, final=False)
                    tokens += pos
                    self.index["seconds"] = seconds0 + time.perf_counter() - t0
                    if kill_after is not None and self.commits >= int(kill_after):
                        os.kill(os.getpid(), signal.SIGKILL)  # mid-shard, after a commit: the test's fault
                    bar.update(self._progress(cursors[-1]) - bar.n)
                    bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")
                self._commit(None, final=True)
        except OSError as err:
            self._abort()
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                kept = sum(len(self.index["splits"][s]["shards"]) for s in self.writers)
                raise UserError(f"the disk is full (writing {self.directory}); the {kept} complete shard(s) "
                                "in the index are kept: free some space and run the same command to resume") from err
            raise
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()

    def _commit(self, at: Cursor | None, final: bool) -> None:
        for split, writer in self.writers.items():
            entry = writer.close()
            info = self.index["splits"][split]
            if entry is not None:
                info["shards"].append(entry)
                info["docs"] += entry["docs"]
                info["tokens"] += entry["tokens"]
            info["complete"] = final
        self.index["cursor"] = None if final else at.to_dict()
        if final:
            self.index["pass"] = None
        shards.write_index(self.directory, self.index)
        self.commits += 1
