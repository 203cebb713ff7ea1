"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half.

Every file the package writes goes through `atomic_write`: write a temporary file in the
same folder, flush it to disk, give it the permissions a plainly created file would have
(`mkstemp` makes it private), then rename it over the target.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """`write(tmp_path)` fills a temporary file, which then replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename in (None, tmp):  # name the file the user asked for, not our temporary one
            raise type(err)(err.errno, err.strerror or str(err), str(path)) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | os.PathLike, flag: str, folder: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: a file where a folder
    is needed, a folder where a file is needed, or a place without write permission.

    Missing folders are fine (writers create them); the nearest existing one decides."""
    from parscale.errors import UserError

    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise UserError(f"{flag} {str(path)!r} is {kind}; give a {'folder' if folder else 'file'} path")
    probe = path if folder and path.exists() else path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag} {str(path)!r}: {str(probe)!r} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {str(path)!r}: no permission to write in {str(probe)!r}; "
                        "choose a path you can write to")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int = 2, sort_keys: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def atomic_save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))
    finally:
        plt.close(fig)
