"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (what schedulers and torchrun send).

The first signal asks the trainer to stop at the next step boundary, where it writes a checkpoint;
the same signal again, a second or more later, stops at once. A signal within that second is the
first one passed on twice: a terminal sends Ctrl-C to torchrun and to its workers, and torchrun
sends it on to the workers as well.
"""

from __future__ import annotations

import os
import signal
import threading
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_AFTER_S = 1.0


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; the exit status a shell expects is 128 + signum (130, 143)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """Once armed, and until the `with` block ends, SIGINT and SIGTERM set `signum` instead of stopping
    the process; a repeat of the signal raises `Interrupted` wherever the program is."""

    def __init__(self):
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        return self

    def arm(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            # os.write, not print: a handler that prints while the program prints fails (reentrant call).
            again = "press Ctrl-C again" if signum == signal.SIGINT else "send SIGTERM again"
            os.write(2, f"\n{signal.Signals(signum).name}: stopping at the end of this step, with a checkpoint "
                        f"({again} to stop at once)\n".encode())
        elif signum == self.signum and time.monotonic() - self._first_at >= REPEAT_AFTER_S:
            raise Interrupted(signum, f"stopped at once by a second {signal.Signals(signum).name}: no checkpoint "
                                      "was written; the newest one is where a rerun resumes")
