"""Points for the scaling-law fit: the paper's measurements (package data) or a user file.

A user file is CSV or JSONL with the columns `params` (non-embedding parameters), `P`
(streams) and `loss`, optionally `tokens` and `label`. Every bad value is reported with
the row it is on, so a typo in a 40-row sweep is found without bisecting the file.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from parscale.errors import UserError
from parscale.law.fitting import MIN_POINTS

PAPER_DATASETS = {
    "paper-stack": ("paper_stack.csv", "Stack-V2-Python (ParScale paper)"),
    "paper-pile": ("paper_pile.csv", "the Pile (ParScale paper)"),
}
REQUIRED = ("params", "P", "loss")
OPTIONAL = ("tokens", "label")


@dataclass(frozen=True, eq=False)
class Points:
    """Measured runs: one entry per (model size, stream count)."""

    params: np.ndarray
    streams: np.ndarray
    loss: np.ndarray
    labels: tuple[str, ...] | None
    tokens: np.ndarray | None
    source: str


def load_points(spec: str) -> Points:
    """`paper-stack`, `paper-pile`, or the path of a .csv / .jsonl file."""
    if spec in PAPER_DATASETS:
        name, title = PAPER_DATASETS[spec]
        text = resources.files("parscale").joinpath("resources", name).read_text()
        return _parse_csv(text, title)
    path = Path(spec)
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(
            f"--data {spec!r}: give {', '.join(PAPER_DATASETS)} or a file ending in .csv or .jsonl"
        )
    if not path.is_file():
        raise UserError(f"data file {spec} does not exist; check the path (or use {', '.join(PAPER_DATASETS)})")
    text = path.read_text()
    return _parse_csv(text, str(path)) if path.suffix.lower() == ".csv" else _parse_jsonl(text, str(path))


def _parse_csv(text: str, source: str) -> Points:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise UserError(
            f"{source}: missing column(s) {', '.join(missing)}; the header must name "
            f"params, P and loss (found: {', '.join(columns) or 'no header'})"
        )
    rows = []
    for row in reader:
        clean = {(k or "").strip(): v for k, v in row.items()}
        if all(v in (None, "") for v in clean.values()):
            continue  # a blank line
        rows.append((f"row {len(rows) + 1} (line {reader.line_num})", clean))
    return _build(rows, source)


def _parse_jsonl(text: str, source: str) -> Points:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"row {len(rows) + 1} (line {lineno})"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{source}, {where}: not valid JSON ({err.msg})") from err
        if not isinstance(obj, dict):
            raise UserError(f"{source}, {where}: each line must be a JSON object with params, P and loss")
        missing = [c for c in REQUIRED if c not in obj]
        if missing:
            raise UserError(f"{source}, {where}: missing column(s) {', '.join(missing)}")
        rows.append((where, obj))
    return _build(rows, source)


def _number(value, column: str, where: str, source: str) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{source}, {where}: {column} is empty; give a number")
    if isinstance(value, bool):  # JSON true/false are not counts
        value = str(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}, {where}: {column} is {value!r}, not a number") from None


def _check_row(n: float, p: float, y: float, where: str, source: str) -> None:
    if not (math.isfinite(n) and n > 0):
        raise UserError(f"{source}, {where}: params must be a positive parameter count, got {n}")
    if not (math.isfinite(p) and p >= 1):
        raise UserError(f"{source}, {where}: P must be at least 1 (the number of streams), got {p}")
    if not (math.isfinite(y) and y > 0):
        raise UserError(f"{source}, {where}: loss must be a positive number, got {y}")


def _build(rows: list[tuple[str, dict]], source: str) -> Points:
    if len(rows) < MIN_POINTS:
        raise UserError(
            f"{source}: {len(rows)} point(s); the law has 4 parameters, so the fit needs at least "
            f"{MIN_POINTS} rows of params, P, loss"
        )
    n, p, y, tokens, labels = [], [], [], [], []
    for where, row in rows:
        values = [_number(row.get(c), c, where, source) for c in REQUIRED]
        _check_row(*values, where, source)
        n.append(values[0]), p.append(values[1]), y.append(values[2])
        tok = row.get("tokens")
        tokens.append(math.nan if tok in (None, "") else _number(tok, "tokens", where, source))
        labels.append(str(row.get("label") or ""))
    return Points(
        params=np.array(n), streams=np.array(p), loss=np.array(y),
        labels=tuple(labels) if any(labels) else None,
        tokens=np.array(tokens) if not np.all(np.isnan(tokens)) else None,
        source=source,
    )
