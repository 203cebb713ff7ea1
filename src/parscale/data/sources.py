"""Documents as a stream: one at a time, from a position that can be saved and resumed.

`datasets` (what `corpus.load_documents` uses) materialises every document in memory and
keeps no byte positions, so a prepare of billions of tokens could neither stay in bounded
memory nor say where a bad byte sits nor continue after an interruption. The readers here
are small by design: text files are one document each, JSON Lines one document per line
(a `.json` holding one array is read whole), parquet one document per row, read a row
batch at a time with pyarrow. A compression suffix (.gz, .bz2, .xz) is looked past.

Each document comes with the `Cursor` just after it; `iter_documents(..., start=cursor)`
continues from there.
"""
from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from parscale.data import corpus
from parscale.errors import UserError, require_extra

log = logging.getLogger(__name__)

ON_BAD_FILE = ("fail", "skip")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_PARQUET_ROWS = 1024  # rows per pyarrow batch: a few MB of text at most


@dataclass(frozen=True)
class Cursor:
    """Where the stream stands: input file `file`, at `offset` in it (a byte offset into the
    decompressed bytes of a JSON Lines file, a row of a parquet file, 0/1 for a text file),
    after `ordinal` documents in all."""

    file: int = 0
    offset: int = 0
    ordinal: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Doc:
    """One document: `key` is what its split hash reads (None: the text itself), `split`
    is forced ("train"/"val") for the user's validation files, else None."""

    text: str
    key: str | None
    split: str | None
    ordinal: int
    after: Cursor


@dataclass(frozen=True)
class Input:
    """One input file; `split` is forced ("train"/"val") when the user gives separate
    validation files, else None (each document's hash decides)."""

    path: Path
    split: str | None = None
    stdlib_key: str | None = None  # the relative path: the stdlib's split hash reads it


class BadFile(Exception):
    """A file (or a part of one) that cannot be read: its path, where (the line of a JSON Lines
    file, else the byte offset) and the cause."""

    def __init__(self, path: Path, offset: int | None, cause: str, resume_at: int | None = None,
                 line: int | None = None):
        where = f", line {line:,}" if line is not None else f" at byte {offset:,}" if offset is not None else ""
        super().__init__(f"{path}{where}: {cause}")
        self.path, self.offset, self.cause, self.line = path, offset, cause, line
        self.resume_at = resume_at  # where reading can continue past the bad part (None: nowhere)


def stdlib_inputs() -> list[Input]:
    root = corpus.stdlib_root()
    return [Input(p, stdlib_key=p.relative_to(root).as_posix()) for p in corpus.stdlib_files(root)]


def file_inputs(files: Sequence[str], val_files: Sequence[str] = ()) -> list[Input]:
    forced = "train" if val_files else None
    if val_files:
        corpus.check_disjoint(files, val_files)
    return ([Input(p, forced) for p in corpus.check_files(files)]
            + [Input(p, "val") for p in corpus.check_files(val_files, "validation file")])


def fingerprint(inputs: Sequence[Input]) -> list[list]:
    """(path, size, mtime, forced split) of each input: changes whenever a file does."""
    return [[*row, inp.split] for row, inp in zip(corpus.fingerprint([i.path for i in inputs]), inputs)]


def _open(path: Path):
    opener = _OPENERS.get(path.suffix.lower(), open)
    if path.suffix.lower() == ".zst":
        raise UserError(f"{path}: zstandard files are not read by the streaming prepare; "
                        "decompress it or recompress with gzip, bz2 or xz")
    return opener(path, "rb")


def _decode(raw: bytes, path: Path, base: int) -> str:
    """UTF-8 text with universal newlines (as Python's text mode reads it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadFile(path, base + err.start, f"not UTF-8 ({err.reason})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _text_docs(inp: Input, offset: int) -> Iterator[tuple[str, int]]:
    if offset:
        return
    with _open(inp.path) as fh:
        raw = fh.read()
    yield _decode(raw, inp.path, 0), 1


def _field(row, path: Path, text_field: str, first: bool):
    if not isinstance(row, dict):
        raise BadFile(path, None, "a JSON row is not an object")
    if text_field not in row and first:
        raise UserError(f"{path} has no field {text_field!r} (its fields: {', '.join(map(str, row))}); "
                        "name the text field (--data-text-field)")
    value = row.get(text_field)
    return value if isinstance(value, str) else None


def _json_error(err: json.JSONDecodeError) -> str:
    """The parser's message, once, with its column (its line is the file's line, said apart)."""
    return f"invalid JSON: {err.msg} (column {err.colno})"


def _line_number(path: Path, offset: int) -> int:
    """The 1-based line at byte `offset` of the (decompressed) file: counted only when a
    resumed read meets a bad line, so a healthy read never rescans."""
    count, left = 1, offset
    with _open(path) as fh:
        while left > 0:
            chunk = fh.read(min(left, 1 << 20))
            if not chunk:
                break
            count, left = count + chunk.count(b"\n"), left - len(chunk)
    return count


def _json_docs(inp: Input, offset: int, text_field: str) -> Iterator[tuple[str | None, int]]:
    with _open(inp.path) as fh:
        head = fh.read(1024).lstrip()
        fh.seek(0)
        if head.startswith(b"["):  # one JSON array: read whole, offset counts rows (JSON Lines stream)
            try:
                rows = json.loads(_decode(fh.read(), inp.path, 0))
            except json.JSONDecodeError as err:
                raise BadFile(inp.path, err.pos, _json_error(err), line=err.lineno) from None
            for i in range(offset, len(rows)):
                yield _field(rows[i], inp.path, text_field, i == 0), i + 1
            return
        fh.seek(offset)
        pos, first = offset, offset == 0
        first_line, seen = (1 if offset == 0 else None), 0  # the line number at `offset`: counted on demand
        for line in fh:
            start, pos, seen = pos, pos + len(line), seen + 1
            if not line.strip():
                continue
            try:
                row = json.loads(_decode(line, inp.path, start))
            except (json.JSONDecodeError, BadFile) as err:
                first_line = first_line or _line_number(inp.path, offset)
                cause, where = (_json_error(err), start) if isinstance(err, json.JSONDecodeError) else (err.cause, err.offset)
                raise BadFile(inp.path, where, cause, resume_at=pos, line=first_line + seen - 1) from None
            yield _field(row, inp.path, text_field, first), pos
            first = False


def _parquet_docs(inp: Input, offset: int, text_field: str) -> Iterator[tuple[str | None, int]]:
    require_extra("pyarrow", f"reading the parquet file {inp.path}")
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(inp.path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise BadFile(inp.path, None, f"not a readable parquet file ({err})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{inp.path} has no field {text_field!r} (its fields: {', '.join(names)}); "
                        "name the text field (--data-text-field)")
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_ROWS, columns=[text_field]):
        values = batch.column(0).to_pylist()
        for value in values:
            row += 1
            if row > offset:
                yield (value if isinstance(value, str) else None), row


def _file_docs(inp: Input, offset: int, text_field: str) -> Iterator[tuple[str | None, int]]:
    kind = corpus.file_kind(inp.path)
    if inp.stdlib_key is not None or kind == "text":
        return _text_docs(inp, offset)
    return _json_docs(inp, offset, text_field) if kind == "json" else _parquet_docs(inp, offset, text_field)


def iter_documents(inputs: Sequence[Input], text_field: str = "text", on_bad_file: str = "fail",
                   start: Cursor = Cursor(), bad: list | None = None) -> Iterator[Doc]:
    """Every non-blank document of `inputs` from `start`, in order, each with its cursor.

    A bad file (unreadable, not UTF-8, invalid JSON) raises a UserError naming the file
    and the byte offset, or with `on_bad_file="skip"` is logged, recorded in `bad` and
    skipped: a bad JSON line alone, a text or parquet file whole. Standard-library files
    that do not decode are skipped silently, as the embedded corpus always has.
    """
    if on_bad_file not in ON_BAD_FILE:
        raise UserError(f"--on-bad-file must be one of {', '.join(ON_BAD_FILE)}, got {on_bad_file!r}")
    ordinal = start.ordinal
    for index in range(start.file, len(inputs)):
        inp, offset = inputs[index], (start.offset if index == start.file else 0)
        while True:
            try:
                for text, pos in _file_docs(inp, offset, text_field):
                    offset = pos
                    if text and text.strip():
                        ordinal += 1
                        yield Doc(text, inp.stdlib_key, inp.split, ordinal - 1,
                                  Cursor(index, pos, ordinal))
                break
            except (OSError, EOFError, BadFile) as err:
                problem = err if isinstance(err, BadFile) else BadFile(inp.path, None, getattr(err, "strerror", None)
                                                                       or str(err))
                if inp.stdlib_key is not None:
                    log.debug("skipping %s", problem)
                    break
                if on_bad_file == "fail":
                    raise UserError(f"cannot read {problem}; fix or remove the file (`parscale data prepare "
                                    "--on-bad-file skip` leaves it out)") from None
                # Said by the pass that records it; the other passes over the same files (the BPE's,
                # the split's) meet the same bad part and stay quiet.
                (log.warning if bad is not None else log.debug)(
                    "skipping %s%s", problem, " (the rest of the file)" if problem.resume_at is None
                    else " (that line only)")
                if bad is not None:
                    bad.append({"path": str(inp.path), "offset": problem.offset, "line": problem.line,
                                "cause": problem.cause})
                if problem.resume_at is None:
                    break
                offset = problem.resume_at  # continue after the bad line
