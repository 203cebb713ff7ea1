"""The exception for user mistakes.

It subclasses ValueError, so library callers can catch the usual type, while the CLI
catches exactly this one and prints its message alone: a user mistake never shows a
traceback, and a real bug still does.
"""


class UserError(ValueError):
    """Bad input from the user. The message names the problem and the fix."""


def reject_unknown_fields(cls, data: dict, what: str) -> None:
    """Config files are checked key by key: a typo must not be silently ignored."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown {what} {', '.join(unknown)}; known: {', '.join(sorted(known))}")
