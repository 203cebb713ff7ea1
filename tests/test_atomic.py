"""Atomic writes: the old content survives a failed write, no temporary file is left, and
the new file gets the permissions a plainly created file would get."""
from __future__ import annotations

import os

import pytest

from parscale.atomic import atomic_write, atomic_write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    atomic_write_json(target, {"a": 1})

    def half_then_crash(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write('{"a": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_crash)
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_mode_follows_the_umask_like_open(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # created by open(): 0o666 & ~umask
    atomic_write_json(tmp_path / "atomic.json", [])
    assert os.stat(tmp_path / "atomic.json").st_mode & 0o777 == os.stat(plain).st_mode & 0o777
