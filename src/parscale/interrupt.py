"""Ctrl-C and SIGTERM: stop cleanly, keep the work, say so in one line.

Outside a long loop, a signal stops at once: `immediate_stop()` (the CLI wraps every verb
in it) turns SIGINT and SIGTERM into `Interrupted`, which the CLI prints as one line and
turns into exit code 130 or 143. Inside `deferred_stop()` (the training loop) the first
signal is only remembered: the loop finishes its update, writes a checkpoint and then raises
`Interrupted`. A second signal raises at once. Nothing half-written survives either way,
because every file goes through `parscale.atomic` or a temporary directory renamed into place.

Signal handlers belong to the main thread; elsewhere both context managers do nothing.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The user stopped the process. `exit_code` is the shell's 128 + signal number.

    A KeyboardInterrupt, so code that already handles Ctrl-C handles SIGTERM the same way."""

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(message or f"interrupted ({signal.Signals(signum).name}); nothing was saved")

    @property
    def message(self) -> str:
        return str(self.args[0])


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _handlers(handler: Callable) -> Iterator[None]:
    if not _main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def immediate_stop() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` wherever the code is."""
    def handler(signum, frame):
        raise Interrupted(signum)

    with _handlers(handler):
        yield


class StopRequest:
    """What `deferred_stop` yields: the signal received so far, if any."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


STOP_NOTICE = "stopping after this step (a checkpoint is being kept); press Ctrl-C again to stop at once"


_recorded = StopRequest()  # what `recorded_stop` has received (none outside it)


@contextlib.contextmanager
def recorded_stop() -> Iterator[StopRequest]:
    """SIGINT and SIGTERM are only recorded, never raised; a `deferred_stop` entered inside
    starts with the recorded stop already requested (its loop stops after one update, with a
    checkpoint). For code that must not be cut at an arbitrary point: a KeyboardInterrupt raised
    while a garbage-collector callback runs is printed as a traceback and then dropped."""
    def handler(signum, frame):
        _recorded.signum = _recorded.signum or signum

    _recorded.signum = None
    try:
        with _handlers(handler):
            yield _recorded
    finally:
        _recorded.signum = None


@contextlib.contextmanager
def deferred_stop(at_once: Callable[[], str] = lambda: "", notice: str = STOP_NOTICE) -> Iterator[StopRequest]:
    """The first signal sets the yielded request and prints `notice` (none if empty); a second
    raises `Interrupted(at_once())`."""
    request = StopRequest()
    request.signum = _recorded.signum  # a stop `recorded_stop` kept before the loop began
    line = f"\n{notice}\n".encode() if notice else b""  # encoded now, not inside the handler

    def handler(signum, frame):
        if request.signum is not None:
            raise Interrupted(signum, at_once())
        request.signum = signum
        if line:
            os.write(2, line)  # os.write: the one output call that is safe inside a signal handler

    with _handlers(handler):
        yield request
