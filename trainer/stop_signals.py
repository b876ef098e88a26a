"""Ctrl-C and SIGTERM (`docker stop`, systemd, `kill`, a closing ComfyUI) stop a run the same careful way.

Python's default leaves SIGTERM fatal at once: no `finally` runs, so a training run loses everything since its last
checkpoint and `bench` leaves its temporary folder. Here the first signal asks the trainer to finish its step and write
a checkpoint; a second one stops at once (as an exception, so clean-up still runs).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python would raise KeyboardInterrupt for Ctrl-C; callers treat both alike."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def terminate_as_interrupt():
    """While entered, SIGTERM raises `Terminated` in the main thread, so `finally` blocks and temporary folders are
    cleaned up. Outside the main thread, where Python cannot set handlers, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class GracefulStop:
    """While entered: the first Ctrl-C or SIGTERM sets `requested` (polled by the trainer between steps, which then
    writes a checkpoint and stops); a second one raises KeyboardInterrupt (Ctrl-C) or Terminated (SIGTERM).

    announce: called with the signal's name on the first one (the CLI tells the user; the pack's worker logs it).
    Outside the main thread, where Python cannot set handlers, nothing changes.
    """

    def __init__(self, announce: Callable[[str], None] | None = None):
        self.count = 0
        self.first: int | None = None  # the signal that asked to stop
        self.announce = announce
        self._previous: dict[int, object] = {}

    def requested(self) -> bool:
        return self.count > 0

    def ask(self) -> None:
        """A stop asked another way (the pack's Stop): the next signal then stops at once, as a second one would."""
        self.count = max(self.count, 1)

    def exit_code(self) -> int:
        """What a shell reports for a process its signal ended: 130 after Ctrl-C, 143 after SIGTERM."""
        return 128 + int(self.first or signal.SIGINT)

    def _handler(self, signum, frame):
        self.count += 1
        self.first = self.first or signum
        if self.count > 1:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        if self.announce is not None:
            self.announce(SIGNAL_NAMES.get(signum, f"signal {signum}"))

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_NAMES:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler set from C, which Python cannot put back
                signal.signal(signum, previous)
        self._previous.clear()


def tell_user(name: str) -> None:
    print(f"\n{name}: stopping after this step to save a checkpoint ({name} again to stop at once)", file=sys.stderr)
