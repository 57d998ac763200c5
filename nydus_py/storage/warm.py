"""Small files decoded right after their LOOKUP (`BlobDevice.warm`), kept for their READ.

Whether to warm at all is the FUSE session's call (`fuse.warm.WarmGate`); this keeps what was
decoded, at most `keep` files, the oldest pushed out unread first, for the one READ that takes it.
"""

import threading

# files kept for their READ (a LOOKUP without a READ leaves one behind until it is pushed out)
WARM_KEEP = 16


class WarmStore:
    def __init__(self, keep: int = WARM_KEEP) -> None:
        self.keep = keep
        self._items: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self.warmed = 0  # files decoded for their READ
        self.hits = 0  # READs answered with them
        self.wasted = 0  # pushed out unread

    def put(self, ino: int, data: bytes) -> None:
        with self._lock:
            items = self._items
            items.pop(ino, None)  # (looked up again: it goes to the back)
            items[ino] = data
            self.warmed += 1
            if len(items) > self.keep:
                del items[next(iter(items))]
                self.wasted += 1

    def take(self, ino: int) -> bytes | None:
        """The decoded file for the READ of all of `ino` (None: not kept)."""
        if not self._items:
            return None
        with self._lock:
            data = self._items.pop(ino, None)
            if data is not None:
                self.hits += 1
            return data

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
