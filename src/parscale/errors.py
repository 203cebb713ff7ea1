"""The exception for user mistakes.

It subclasses ValueError, so library callers can catch the usual type, while the CLI
catches exactly this one and prints its message alone: a user mistake never shows a
traceback, and a real bug still does. File-system errors (a path that cannot be written,
a full disk) are the user's to fix too; `describe_os_error` gives them one line, and a
missing optional dependency `require_extra` (the extra of pyproject.toml that brings it).
"""
from __future__ import annotations

import errno
import importlib.util


class UserError(ValueError):
    """Bad input from the user. The message names the problem and the fix."""


def reject_unknown_fields(cls, data: dict, what: str) -> None:
    """Config files are checked key by key: a typo must not be silently ignored."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown {what} {', '.join(unknown)}; known: {', '.join(sorted(known))}")


_OS_HINTS = {
    errno.EACCES: "no permission; choose a path you can write to, or change its permissions",
    errno.EPERM: "not permitted; choose a path you can write to, or change its permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder, not a file; give a file name",
    errno.EEXIST: "a file stands where a folder is needed; choose another path or move that file",
    errno.ENOENT: "it does not exist; check the path",
    errno.ENOSPC: "the disk is full; free some space or write elsewhere (nothing already written was changed)",
    errno.EDQUOT: "the disk quota is used up; free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EFBIG: "the file outgrew what may be written there (a size limit or a full disk); "
                 "free some space or write elsewhere (nothing already written was changed)",
}


def describe_os_error(err: OSError) -> str:
    """One line for a file-system error: the path, what went wrong and what to do."""
    path = err.filename if err.filename is not None else ""
    hint = _OS_HINTS.get(err.errno or -1)
    what = err.strerror or str(err)
    where = f"{str(path)!r}: " if path != "" else ""
    return f"{where}{what}" + (f" ({hint})" if hint else "")


# The module an optional feature imports -> the extra of pyproject.toml that installs it.
EXTRAS = {"lm_eval": "eval", "matplotlib": "plot", "datasets": "train", "pyarrow": "train", "vllm": "serve",
          "trl": "sft"}


def missing_extra(module: str, purpose: str) -> str:
    """One line: what needs `module`, and the pip command of its extra."""
    extra = EXTRAS.get(module)
    fix = f'pip install "parscale[{extra}]"' if extra else f"pip install {module}"
    return f"{purpose} needs {module}, which is not installed; install it with: {fix}"


def has_module(module: str) -> bool:
    """Whether `module` can be imported, found without importing it (lm-eval takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def require_extra(module: str, purpose: str) -> None:
    """A UserError naming the extra to install when `module` is missing, before any work."""
    if not has_module(module):
        raise UserError(missing_extra(module, purpose))
