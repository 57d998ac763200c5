"""Which directory a depth-first walk lists next, so it can be decoded before it is asked for.

`find`, `ls -R`, `du` and `tar` walk a tree depth first: once directory D has been listed to its
end, the next directory listed is D's first subdirectory, or, when D has none, the next
subdirectory after D in its parent's listing, or after its parent in the grandparent's, and so
on (listing order: what readdir returned, the image's sorted names). The FUSE session calls
`listed` when a listing ends (after the reply with its last entries, or its empty READDIR);
the filesystem then decodes the predicted directory while the walker works through D's
entries. A wrong guess costs one decode that a later request may still use (the listings are
an LRU).

Sans-IO: directories are numbers. It keeps, per directory whose turn has not come yet, the one
to go to after it; entries are taken when their directory ends, and the table is bounded (a
walk that is not depth first only loses the predictions, cleared when the table is full).
"""

from collections.abc import Sequence

# directories waiting for their turn, at most: a depth-first walk keeps its frontier here
WALK_TABLE = 1024


class WalkAhead:
    def __init__(self, cap: int = WALK_TABLE) -> None:
        self.cap = cap
        self._after: dict[int, int] = {}
        self.predicted = 0

    def listed(self, d: int, subdirs: Sequence[int]) -> int | None:
        """Directory `d` was listed to its end; `subdirs` are its subdirectories in listing
        order. The directory a depth-first walk lists next (None: the walk is over, or unknown)."""
        after = self._after.pop(d, None)
        if subdirs:
            table = self._after
            if len(table) + len(subdirs) > self.cap:
                table.clear()
            for a, b in zip(subdirs, subdirs[1:], strict=False):
                table[a] = b
            if after is not None:
                table[subdirs[-1]] = after
            after = subdirs[0]
        if after is not None:
            self.predicted += 1
        return after

    def clear(self) -> bool:
        """Forget the waiting directories (an idle mount's trim); whether there were any."""
        held = bool(self._after)
        self._after.clear()
        return held
