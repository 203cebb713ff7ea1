"""Where documents come from: the embedded standard-library corpus or the user's local files.

A document is one string. The default corpus is the Python standard library's own `.py`
sources on this machine (no download, identical on every machine with the same Python).
User files go through `datasets` (text, JSON/JSONL, parquet), on local paths only.
Splits are made per document from a stable hash, so a document never sits in both splits
and the split does not change from one run to the next.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

from parscale.errors import UserError, require_extra

log = logging.getLogger(__name__)

# Test suites are excluded: they are large, repetitive and full of fixtures (binary-ish
# data, deliberately broken code), which is not the code we want the model to learn.
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_JSON_SUFFIXES = frozenset({".json", ".jsonl", ".ndjson"})
_PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
_COMPRESSED_SUFFIXES = frozenset({".gz", ".bz2", ".xz", ".zst"})


def stdlib_root() -> Path:
    """The directory holding the running Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every readable standard-library `.py` file, sorted, minus test suites and site-packages."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise UserError(f"the Python standard library directory {root} does not exist; "
                        "give your own files (--data-files in train, --data in eval)")
    picked = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if any(part in _TEST_DIRS for part in parts[:-1]):
            continue
        if path.is_file() and os.access(path, os.R_OK):
            picked.append(path)
    return sorted(picked, key=lambda p: p.relative_to(root).as_posix())


def read_stdlib_documents(paths: Sequence[Path], root: Path | None = None) -> list[tuple[str, str]]:
    """(relative posix path, text) of each file that decodes as UTF-8 and is not empty."""
    root = stdlib_root() if root is None else Path(root)
    docs = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:  # unreadable files are skipped, by design
            log.debug("skipping %s: %s", path, err)
            continue
        if text.strip():
            docs.append((path.relative_to(root).as_posix(), text))
    return docs


def stable_unit(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by (key, seed) on every machine (unlike `hash()`)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_keys(keys: Sequence[str], val_fraction: float, seed: int) -> list[bool]:
    """Which keys go to validation: those whose stable hash falls under `val_fraction`.

    At least one key goes to each side (when there are two or more), so a small corpus
    still gets a validation set instead of an empty one.
    """
    if len(keys) < 2:
        raise UserError(f"the corpus has {len(keys)} document(s); at least 2 are needed to split off "
                        "a validation set; add documents or give validation files (--data-val-files)")
    units = [stable_unit(k, seed) for k in keys]
    is_val = [u < val_fraction for u in units]
    if not any(is_val):
        is_val[min(range(len(keys)), key=units.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(keys)), key=units.__getitem__)] = False
    return is_val


def check_files(files: Sequence[str | os.PathLike], what: str = "data file") -> list[Path]:
    """Resolve user paths (a directory means every file under it); a missing one is a UserError."""
    out: list[Path] = []
    for name in files:
        path = Path(name).expanduser()
        if path.is_dir():
            # Anything under a hidden folder is skipped too: `.git/` objects, `.ipynb_checkpoints/` copies.
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise UserError(f"the {what} directory {path} holds no files")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise UserError(f"the {what} {str(name)!r} does not exist; check the path "
                            "(only local files are read, nothing is downloaded)")
    return out


def check_disjoint(train_files: Sequence[str | os.PathLike], val_files: Sequence[str | os.PathLike]) -> None:
    """UserError if a validation file is also a training file (the held-out loss would not be)."""
    train = {os.path.realpath(p) for p in check_files(train_files)}
    both = sorted(str(p) for p in check_files(val_files, "validation file") if os.path.realpath(p) in train)
    if both:
        shown = ", ".join(both[:3]) + (f" and {len(both) - 3} more" if len(both) > 3 else "")
        raise UserError(f"{len(both)} validation file(s) are also training files: {shown}; give validation "
                        "files that are not among --data-files (or drop --data-val-files to split off a share)")


def file_kind(path: Path) -> str:
    """The `datasets` builder for a file: 'json', 'parquet' or 'text' (any other suffix).

    A compression suffix is looked past (`notes.jsonl.gz` is JSON): `datasets` decompresses.
    """
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSED_SUFFIXES:
        suffixes.pop()
    suffix = suffixes[-1] if suffixes else ""
    if suffix in _JSON_SUFFIXES:
        return "json"
    if suffix in _PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def fingerprint(paths: Sequence[Path]) -> list[list]:
    """(path, size, mtime) of each file: cheap, and changes whenever a file does."""
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def load_documents(files: Sequence[str | os.PathLike], text_field: str = "text",
                   cache_dir: Path | None = None) -> list[str]:
    """All documents of the user's local files, in file order.

    Text files (any suffix but JSON and parquet) are one document each; JSON/JSONL and
    parquet give one document per row, read from `text_field`. Loading goes through
    `datasets` with the hub switched off for the call, so nothing can reach the network.
    """
    paths = check_files(files)
    docs: list[str] = []
    # One `datasets` call per run of same-kind files (not per file), keeping the user's order.
    start = 0
    for end in range(1, len(paths) + 1):
        if end == len(paths) or file_kind(paths[end]) != file_kind(paths[start]):
            docs.extend(_load_group(paths[start:end], text_field, cache_dir))
            start = end
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise UserError(f"the data files {[str(f) for f in files]} hold no text (all documents are empty)")
    return docs


def _load_group(paths: Sequence[Path], text_field: str, cache_dir: Path | None) -> list[str]:
    require_extra("datasets", "reading data files with `datasets`")
    import datasets  # deferred: heavy, and only needed for user files

    kind = file_kind(paths[0])
    named = str(paths[0]) if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more {kind} files)"
    kwargs: dict = {"sample_by": "document", "keep_linebreaks": True} if kind == "text" else {}
    try:
        with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True):
            ds = datasets.load_dataset(kind, data_files=[str(p) for p in paths], split="train",
                                       cache_dir=None if cache_dir is None else str(cache_dir), **kwargs)
    except Exception as err:  # noqa: BLE001 - any parse failure is the file's fault; name it
        raise UserError(f"cannot read {named} as {kind}: {err}") from err
    if kind == "text":
        return [str(t) for t in ds["text"]]
    if text_field not in ds.column_names:
        raise UserError(f"{named} has no field {text_field!r} (its fields: {', '.join(ds.column_names)}); "
                        "name the text field (--data-text-field in train, --text-field in eval)")
    return [t for t in ds[text_field] if isinstance(t, str)]
