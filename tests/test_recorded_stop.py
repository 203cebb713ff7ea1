"""The stop that is only recorded (a demo worker outside its trainer's loop) and the loop that takes it."""
from __future__ import annotations

import os
import signal

from parscale.interrupt import deferred_stop, recorded_stop


def test_a_stop_recorded_before_the_loop_is_never_raised_and_the_loop_takes_it():
    before = signal.getsignal(signal.SIGINT)
    with recorded_stop() as recorded:
        os.kill(os.getpid(), signal.SIGINT)  # recorded, not raised as KeyboardInterrupt
        assert recorded.signum == signal.SIGINT
        with deferred_stop() as stop:  # the trainer's loop starts with the stop already requested
            assert stop.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back
    with deferred_stop() as stop:  # nothing is carried past recorded_stop
        assert not stop
