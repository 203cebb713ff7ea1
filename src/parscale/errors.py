"""The exception for user mistakes.

It subclasses ValueError, so library callers can catch the usual type, while the CLI
catches exactly this one and prints its message alone: a user mistake never shows a
traceback, and a real bug still does.
"""


class UserError(ValueError):
    """Bad input from the user. The message names the problem and the fix."""
