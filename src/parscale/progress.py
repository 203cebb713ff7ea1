"""Progress: a bar on a terminal, a plain line now and then anywhere else.

A bar redraws itself with carriage returns and cursor-moving escape codes. On a terminal that
is what one wants; in a log file or a pipe it leaves hundreds of partial lines and escape
codes. So `progress(...)` gives a tqdm bar only when stderr is a terminal, and otherwise an
object with the same methods that logs one complete line (logger `parscale.progress`, INFO)
at the first update, then every `every_s` seconds, and at the end. While a bar is shown, log
records are printed above it (tqdm's `logging_redirect_tqdm`), so a message such as "saved
ckpt-0000020" is never glued onto the bar.

    with progress(total=steps, desc="run", unit="step") as bar:
        for step in range(steps):
            ...
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.update(1)

`use_lines()` forces lines in this process: the demo's workers, two runs writing to one
terminal, each print their own lines instead of two bars drawing over each other.
`TQDM_DISABLE=1` turns bars and lines off.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger(__name__)
_LINE = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_LINE_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"
_forced_lines = False
_now = time.perf_counter  # the clock of the lines (a test's clock in the tests)
_redirecting = 0  # bars open with log records redirected above them (only the outermost redirects)


def use_lines() -> None:
    """Plain lines instead of bars for the rest of this process."""
    global _forced_lines
    _forced_lines = True


def _quiet() -> bool:
    return os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


def on_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return not _forced_lines and bool(isatty and isatty())


def progress(iterable=None, *, total: float | None = None, desc: str = "", unit: str = "it", initial: int = 0,
             leave: bool = True, disable: bool = False, every_s: float = 30.0, unit_scale: bool = False):
    """A tqdm bar on a terminal, else `Lines`; both iterate `iterable` and are context managers.

    `leave`: keep the bar when done; as lines, a run that leaves (a training run) also logs its
    first update and its end, a transient one (an evaluation inside it) only every `every_s`."""
    if disable or _quiet() or not on_terminal():
        return Lines(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, every_s=every_s,
                     unit_scale=unit_scale, quiet=disable or _quiet())
    from tqdm.auto import tqdm

    bar = tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, unit_scale=unit_scale,
               dynamic_ncols=True, disable=False)  # TQDM_DISABLE was read above, not when tqdm was imported
    return _Redirected(bar)


class _Redirected:
    """A tqdm bar whose lifetime routes the root logger's console output through `tqdm.write`."""

    def __init__(self, bar) -> None:
        global _redirecting
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar, self._redirect = bar, contextlib.ExitStack()
        if _redirecting == 0:
            self._redirect.enter_context(logging_redirect_tqdm())
        _redirecting += 1

    def __getattr__(self, name: str):
        return getattr(self.bar, name)

    def __iter__(self):
        try:
            yield from self.bar
        finally:
            self.close()

    def close(self) -> None:
        global _redirecting
        if self._redirect is None:
            return
        self.bar.close()
        self._redirect.close()
        self._redirect, _redirecting = None, _redirecting - 1

    def __enter__(self) -> "_Redirected":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Lines:
    """The bar's methods without a bar: complete lines, every `every_s` seconds; one that
    `leave`s also logs its first update and its end (unless an exception ends it)."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", initial=0, leave=True, every_s=30.0,
                 unit_scale=False, quiet=False) -> None:
        self.iterable, self.desc, self.unit, self.leave, self.every_s = iterable, desc, unit, leave, every_s
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n, self.initial, self.postfix, self.unit_scale, self.quiet = initial, initial, "", unit_scale, quiet
        self.start = _now()
        self.last: float | None = None  # when the last line was logged
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def update(self, n: float = 1) -> None:
        self.n += n
        now = _now()
        first = self.last is None and self.leave
        if first or now - (self.last or self.start) >= self.every_s:
            self._log(now)

    def line(self) -> str:
        """The state as one line: what, how far, how long, how fast, and the postfix."""
        from tqdm import tqdm

        elapsed = _now() - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else None
        text = tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc or "progress", unit=self.unit,
                                 unit_scale=self.unit_scale, rate=rate, postfix=self.postfix or None,
                                 bar_format=_LINE if self.total else _LINE_NO_TOTAL)
        return " ".join(text.split())

    def _log(self, now: float) -> None:
        self.last = now
        if not self.quiet:
            log.info("%s", self.line())

    def close(self, logged: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if logged and self.leave and self.n > self.initial:
            self._log(_now())

    def __enter__(self) -> "Lines":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        self.close(logged=exc_type is None)
