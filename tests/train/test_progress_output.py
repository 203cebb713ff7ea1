"""What a training run prints into a log (stderr not a terminal): complete lines, no bar."""
from __future__ import annotations

import re

from _trainkit import cli_args, micro_setup, run_train


def test_a_run_logged_to_a_file_prints_plain_lines_and_messages_on_their_own(tmp_path):
    opts = micro_setup(tmp_path)
    opts.update(P=2, steps=4, eval_every=2, save_every=2)
    result = run_train(cli_args(opts) + ["--out", str(tmp_path / "run")], TQDM_DISABLE="")  # stderr is a pipe
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    assert "\r" not in err and "\x1b" not in err  # no bar redrawn in place, no cursor movement
    lines = err.splitlines()
    assert "saved ckpt-0000002" in lines and "saved ckpt-0000004" in lines  # each message a line of its own
    progress = [line for line in lines if re.match(r"run: \d+/4 step \[", line)]
    # a four-step run: its first update and its end, not a line per redraw
    assert [p.split(" [")[0] for p in progress] == ["run: 1/4 step", "run: 4/4 step"], err[-3000:]
    assert "loss=" in progress[-1] and "val=" in progress[-1]
