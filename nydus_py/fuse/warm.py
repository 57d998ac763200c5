"""Whether to warm small files after their LOOKUP: do READs follow LOOKUPs now?

A process that opens a small file by path sends LOOKUP, then READ of the whole file as soon as
it has woken up with the LOOKUP's answer. A transport that decodes the file between the two
(`Then.after`, `Filesystem.warm`) takes the decode off the READ's critical path. When LOOKUPs
are not followed by READs (stat, access checks), that work is wasted and delays the next
request. The gate watches the last few LOOKUPs of small files and the READs that name them,
and says "warm" while enough LOOKUPs are followed by a READ.

Lock-free on purpose (it sits on every LOOKUP and READ): dict operations are atomic under the
GIL; a lost update of the score between threads only shifts a heuristic by one.
"""

# LOOKUPs remembered: one unread after this many later LOOKUPs counts as not followed
WATCH = 16
# the score's bounds: how many net READs (or misses) it remembers
SCORE_LIMIT = 8
# while warming is off, one small file's LOOKUP in this many is watched (the way back when
# READs follow again); the others only count
SKIP_SAMPLE = 4


class WarmGate:
    """The score of the last LOOKUPs of small files: +1 for one whose READ came, -1 for one
    pushed out of the watch list unread; warm while it is not negative."""

    def __init__(self, watch: int = WATCH, limit: int = SCORE_LIMIT, sample: int = SKIP_SAMPLE) -> None:
        self.watch = watch
        self.limit = limit
        self.sample = sample
        self.score = 0
        self._tick = 0
        self._watched: dict[int, None] = {}
        self.warmed = 0  # LOOKUPs the gate let warm
        self.skipped = 0  # LOOKUPs it did not (READs were not following)
        self.followed = 0  # watched LOOKUPs whose READ came
        self.unfollowed = 0  # watched LOOKUPs pushed out unread

    def looked_up(self, nodeid: int) -> bool:
        """A LOOKUP of small file `nodeid` was answered; whether to warm it. While warming is
        off, only one of `sample` such LOOKUPs is watched (the way back when READs follow
        again); the rest cost a count. (Counted over small files' LOOKUPs only: a walk that
        alternates a directory and a file would otherwise never sample its files.)"""
        if self.score < 0:
            self._tick += 1
            if self._tick % self.sample:
                self.skipped += 1
                return False
        watched = self._watched
        watched[nodeid] = None
        if len(watched) > self.watch:  # the oldest watched LOOKUP went unread
            try:
                del watched[next(iter(watched))]
            except (StopIteration, KeyError, RuntimeError):  # (another thread's turn)
                pass
            else:
                self.unfollowed += 1
                if self.score > -self.limit:
                    self.score -= 1
        if self.score >= 0:
            self.warmed += 1
            return True
        self.skipped += 1
        return False

    def read(self, nodeid: int) -> None:
        """A READ from offset 0 of `nodeid` came."""
        if self._watched and self._watched.pop(nodeid, 0) is None:
            self.followed += 1
            if self.score < self.limit:
                self.score += 1
