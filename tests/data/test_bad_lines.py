"""A bad JSON line is named by its line number with the parser's message once, said once however
many passes read the file; an empty file is not a document."""
from __future__ import annotations

import json
import logging

import pytest

from parscale.data import corpus, store
from parscale.data.prepare import DataConfig
from parscale.data.sources import Cursor, Input, iter_documents
from parscale.errors import UserError

GOOD = [json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 4}) for i in range(12)]
BROKEN = '{"text": broken}'


def _jsonl(path, lines: list[str]) -> int:
    """Write the lines; the 1-based number of the broken one, counted here."""
    path.write_text("".join(line + "\n" for line in lines))
    return lines.index(BROKEN) + 1


def _parser_says(text: str) -> tuple[str, int]:
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return err.msg, err.colno
    raise AssertionError("the line parses")


def test_a_bad_json_line_is_named_by_its_number_with_the_parser_message_once(tmp_path):
    path = tmp_path / "d.jsonl"
    number = _jsonl(path, GOOD[:2] + [""] + GOOD[2:4] + [BROKEN] + GOOD[4:])  # a blank line counts as a line
    msg, column = _parser_says(BROKEN)
    with pytest.raises(UserError) as caught:
        list(iter_documents([Input(path)]))
    text = str(caught.value)
    assert text == (f"cannot read {path}, line {number}: invalid JSON: {msg} (column {column}); fix or remove the "
                    "file (`parscale data prepare --on-bad-file skip` leaves it out)")
    assert number == 6 and text.count(msg) == 1 and "byte" not in text


def test_a_resumed_read_still_counts_lines_from_the_top(tmp_path):
    path = tmp_path / "d.jsonl"
    number = _jsonl(path, GOOD[:5] + [BROKEN] + GOOD[5:])
    docs = iter_documents([Input(path)])
    after_two = [next(docs), next(docs)][-1].after  # where a stopped prepare would continue
    assert after_two.offset > 0
    with pytest.raises(UserError, match=rf", line {number}: invalid JSON"):
        list(iter_documents([Input(path)], start=Cursor(after_two.file, after_two.offset, after_two.ordinal)))


def test_a_skipped_line_is_said_once_across_every_pass(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    number = _jsonl(path, GOOD[:6] + [BROKEN] + GOOD[6:])
    cfg = DataConfig(files=(str(path),), vocab_size=300, val_fraction=0.25)  # the BPE pass reads the file too
    with caplog.at_level(logging.DEBUG, logger="parscale"):
        result = store.prepare_corpus(cfg, tmp_path / "out", on_bad_file="skip")
    said = [r for r in caplog.records if r.levelno >= logging.WARNING and "skipping" in r.getMessage()]
    assert [r.getMessage() for r in said] == [f"skipping {path}, line {number}: invalid JSON: "
                                              f"{_parser_says(BROKEN)[0]} (column {_parser_says(BROKEN)[1]}) "
                                              "(that line only)"]
    assert [(s["line"], s["cause"].startswith("invalid JSON")) for s in result["skipped"]] == [(number, True)]
    assert sum(r["docs"] for r in result["splits"].values()) == len(GOOD)  # every good line read


def test_an_empty_file_is_not_a_document(tmp_path):
    texts = ["def a():\n    pass\n", "def b():\n    return 1\n", "class C:\n    x = 2\n"]
    for i, text in enumerate(texts):
        (tmp_path / f"t{i}.py").write_text(text)
    (tmp_path / "empty.py").write_text("")
    (tmp_path / "blank.py").write_text(" \n\n\t\n")
    files = sorted(tmp_path.glob("*.py"))
    assert len(files) == 5 and len(list(iter_documents([Input(p) for p in files]))) == len(texts)
    assert sorted(corpus.load_documents(files)) == sorted(texts)
    cfg = DataConfig(files=tuple(str(p) for p in files), vocab_size=300, val_fraction=0.3)
    result = store.prepare_corpus(cfg, tmp_path / "out")
    assert sum(r["docs"] for r in result["splits"].values()) == len(texts)
