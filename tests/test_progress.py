"""Progress output: a bar on a terminal with log messages above it, plain lines elsewhere."""
from __future__ import annotations

import io
import logging
import re
import sys

import pytest

from parscale import progress as progress_mod
from parscale.progress import Lines, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    """A clock the test moves by hand: `clock.t` seconds."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(progress_mod, "_forced_lines", False)
    state = type("Clock", (), {"t": 0.0})()
    monkeypatch.setattr(progress_mod, "_now", lambda: state.t)
    return state


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "parscale.progress"]


def test_elsewhere_a_run_logs_its_first_update_every_30_s_and_its_end(clock, caplog):
    caplog.set_level(logging.INFO, logger="parscale.progress")
    with progress(total=100, desc="run", unit="step") as bar:
        assert isinstance(bar, Lines)  # pytest's captured stderr is no terminal
        for _ in range(100):
            clock.t += 1.0
            bar.set_postfix(loss="4.200")
            bar.update(1)
    lines = _lines(caplog)
    # updates at t = 1, 2, ..., 100 s: lines at 1 (the first), 31, 61 and 91 (30 s apart), and the end
    assert len(lines) == 5
    assert lines[0].startswith("run: 1/100 step [") and lines[-1].startswith("run: 100/100 step [")
    assert all("loss=4.200" in line and "\r" not in line and "\x1b" not in line for line in lines)


def test_a_transient_one_logs_only_when_it_lasts(clock, caplog):
    caplog.set_level(logging.INFO, logger="parscale.progress")
    for _ in progress(range(10), desc="evaluating", unit="batch", leave=False):
        clock.t += 1.0  # ten seconds in all: no line
    assert _lines(caplog) == []
    for _ in progress(range(40), desc="evaluating", unit="batch", leave=False):
        clock.t += 1.0
    assert [line.split(" [")[0] for line in _lines(caplog)] == ["evaluating: 30/40 batch"]


def test_on_a_terminal_a_bar_and_log_messages_on_their_own_lines(clock, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # as the CLI's logging.basicConfig makes it
    root.addHandler(handler)
    log = logging.getLogger("parscale.test")
    monkeypatch.setattr(log, "level", logging.INFO)
    try:
        with progress(total=4, desc="run", unit="step") as bar:
            assert not isinstance(bar, Lines)
            for step in range(1, 5):
                bar.set_postfix(tok_s="689")
                bar.update(1)
                if step == 2:
                    log.info("saved ckpt-0000002")
        assert root.handlers.count(handler) == 1  # the CLI's handler is back after the bar
    finally:
        root.removeHandler(handler)
    out = terminal.getvalue()
    assert "run:" in out and "\r" in out  # a bar, redrawn in place
    assert out.count("saved ckpt-0000002\n") == 1
    assert re.search(r"(^|[\r\n])saved ckpt-0000002\n", out), out  # never glued onto "tok_s=689]"


def test_use_lines_draws_no_bar_even_on_a_terminal(clock, monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    with progress(total=3) as bar:
        assert not isinstance(bar, Lines)
    progress_mod.use_lines()  # what each demo worker does: two bars would draw over each other
    with progress(total=3) as bar:
        assert isinstance(bar, Lines)


def test_a_demo_worker_logs_lines_where_the_parent_would_draw_a_bar():
    """Two runs in two workers share the terminal: each logs its own lines, neither draws a bar."""
    import subprocess

    code = ("import io, logging, sys\n"
            "class Terminal(io.StringIO):\n    def isatty(self): return True\n"
            "sys.stderr = Terminal()\n"
            "from parscale.progress import Lines, progress\n"
            "from parscale.demo import runner\n"
            "with progress(total=1) as bar: before = isinstance(bar, Lines)\n"
            "runner._init_worker()\n"
            "with progress(total=1) as bar: after = isinstance(bar, Lines)\n"
            "print(before, after, logging.getLogger('parscale.progress').isEnabledFor(logging.INFO))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in __import__("os").environ.items() if k != "TQDM_DISABLE"})
    assert out.stdout.split() == ["False", "True", "True"]
