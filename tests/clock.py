"""A clock for tests that moves only when the test advances it (token ages, backoffs, rates)."""

from __future__ import annotations

import threading


class ManualClock:
    """Callable like time.monotonic; `advance` is the only way time passes."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move time forward (never back) and return the new reading."""
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        with self._lock:
            self._now += seconds
            return self._now
