"""Bounds for reading hostile images: a count of work done, and a hang guard.

"Finishes quickly" is checked by counting function calls (Python and built-in) with a profile
hook, not by a stopwatch: the count is the same on an idle laptop and on a loaded CI machine, and
a quadratic blow-up or a loop over a forged billion-entry count still shows as a huge number.
The SIGALRM deadline only ends a block that hangs in C, where no call is counted.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

HARD_LIMIT = 10  # seconds: a hang guard, never reached by a working reader


class Hang(Exception):
    pass


class OverBudget(AssertionError):
    """More calls than the budget allows: the reader does unbounded work for these bytes."""


@contextlib.contextmanager
def deadline(seconds: int = HARD_LIMIT) -> Iterator[None]:
    """Abort the block with Hang after `seconds` (SIGALRM; pytest runs tests in the main thread)."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class CallCount:
    def __init__(self) -> None:
        self.calls = 0


@contextlib.contextmanager
def call_budget(limit: int) -> Iterator[CallCount]:
    """Count the calls made in the block; past `limit` raise OverBudget at once (and, should
    the code under test swallow it, when the block ends)."""
    count = CallCount()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" or event == "c_call":
            count.calls += 1
            if count.calls > limit:
                raise OverBudget(f"more than {limit} calls")  # also switches the hook off

    old = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield count
    finally:
        sys.setprofile(old)
    if count.calls > limit:
        raise OverBudget(f"more than {limit} calls (the code under test swallowed the first report)")
