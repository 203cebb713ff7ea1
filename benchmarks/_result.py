"""The end every benchmark shares: the command and the machine go into the result, written atomically.

Benchmarks run as `python benchmarks/NAME.py`, so this sibling module is importable as `_result`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from parscale.atomic import atomic_write_json
from parscale.machine import describe


def command(script: str, argv: list[str] | None = None) -> str:
    """`python benchmarks/NAME.py ARGS`: how to run it again (no path of the machine it ran on)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(script).name}", *args])


def write_result(out: str | Path, result: dict[str, Any], script: str, argv: list[str] | None = None,
                 machine: dict[str, Any] | None = None) -> Path:
    """Write `result` with "command" (unless it has one) and "machine" (describe()) to `out`,
    and say so. `machine`: describe() taken earlier, e.g. when the table's header was printed."""
    result = {"command": command(script, argv), **result, "machine": machine or describe()}
    path = atomic_write_json(out, result)
    inside = path.resolve().is_relative_to(Path.cwd())
    print(f"wrote {os.path.relpath(path) if inside else path}")
    return path
