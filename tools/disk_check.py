"""One check of free disk before a set-up step (the Makefile's for .venv, serve_env.py's for
.venv-serve): a full disk otherwise shows up minutes into pip as an OSError. Standard library
only, so that it runs before any venv exists.

Usage: python tools/disk_check.py NEED_GB WHERE
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path


def check_disk(where: Path, need: float) -> None:
    """Exit with one line unless `need` GB are free on the disk that holds `where`."""
    free = shutil.disk_usage(where).free / 1e9
    if free < need:
        sys.exit(f"error: setting up {where} needs about {need:g} GB of free disk and {free:.1f} GB "
                 "are free here; free some space (old clones' .venv and .venv-serve: make clean) "
                 "and rerun")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tools/disk_check.py NEED_GB WHERE")
    check_disk(Path(sys.argv[2]), float(sys.argv[1]))
