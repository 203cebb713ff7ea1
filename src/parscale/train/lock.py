"""One trainer per run directory: an advisory lock on `RUN_DIR/.lock`.

`fcntl.flock` rather than a pid file checked by hand: the kernel drops the lock when its
process dies, however it dies, so a killed run never blocks its directory, and there is no
pid to misread. The file holds the owner's pid only to name it in the error message.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from parscale.errors import UserError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of `run_dir` (created if missing) for the duration of the block."""
    if not enabled:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{str(run_dir)!r} is in use by another training process (pid {owner}); "
                            "wait for it to finish or stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
