"""File ranges whose read just failed, answered EIO at once for a moment.

When a READ the kernel sent for readahead fails, the kernel asks again right away for the page
the process wanted: a second READ inside the first one's range. Without a memory of the failure
that second READ waits a whole backend deadline again, and one read(2) takes two deadlines.
With it, one read(2) of a stalled image ends within one deadline."""

import threading
import time
from collections.abc import Callable

HOLD = 1.0  # seconds a failed range answers EIO at once (the follow-up READ comes within ms)
_CAP = 4096  # inodes remembered at most (oldest dropped)


class RecentFailures:
    def __init__(self, hold: float = HOLD, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold = hold
        self.clock = clock
        self.fast_failures = 0  # reads answered EIO from memory
        self._ranges: dict[int, tuple[int, int, float]] = {}  # ino -> (start, end, until)
        self._lock = threading.Lock()

    def failed(self, ino: int, start: int, end: int) -> None:
        until = self.clock() + self.hold
        with self._lock:
            self._ranges.pop(ino, None)
            self._ranges[ino] = (start, end, until)
            while len(self._ranges) > _CAP:
                del self._ranges[next(iter(self._ranges))]

    def clear(self) -> None:
        """Forget every failure (the backend's settings changed: the next reads ask it again)."""
        with self._lock:
            self._ranges.clear()

    def covers(self, ino: int, start: int, end: int) -> bool:
        """True (and counted) when [start, end) lies in a range of `ino` that failed < hold ago."""
        if not self._ranges:  # the common case: nothing failed, no lock
            return False
        with self._lock:
            r = self._ranges.get(ino)
            if r is None:
                return False
            if self.clock() >= r[2]:
                del self._ranges[ino]
                return False
            if not (r[0] <= start and end <= r[1]):
                return False
            self.fast_failures += 1
            return True
