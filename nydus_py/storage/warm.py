"""Small files decoded right after their LOOKUP (`BlobDevice.warm`), kept for their READ.

Whether to warm at all is the FUSE session's call (`fuse.warm.WarmGate`); this keeps what was
decoded, at most `keep` files and `max_bytes`, the oldest pushed out unread first, for the one
READ that takes it. An idle mount's trimmer clears it.
"""

import threading

# files kept for their READ (a LOOKUP without a READ leaves one behind until it is pushed out)
WARM_KEEP = 16
WARM_BYTES = 1 << 20


class WarmStore:
    def __init__(self, keep: int = WARM_KEEP, max_bytes: int = WARM_BYTES) -> None:
        self.keep = keep
        self.max_bytes = max_bytes
        self.size = 0
        self._items: dict[int, bytes | memoryview] = {}
        self._lock = threading.Lock()
        self.warmed = 0  # files decoded for their READ
        self.hits = 0  # READs answered with them
        self.wasted = 0  # pushed out unread

    def put(self, ino: int, data: bytes | memoryview) -> None:
        with self._lock:
            items = self._items
            old = items.pop(ino, None)  # (looked up again: it goes to the back)
            if old is not None:
                self.size -= len(old)
            items[ino] = data
            self.size += len(data)
            self.warmed += 1
            while len(items) > self.keep or self.size > self.max_bytes:
                self.size -= len(items.pop(next(iter(items))))
                self.wasted += 1

    def take(self, ino: int, room: int = -1) -> bytes | memoryview | None:
        """The file `ino` as read, for a READ of all of it (of `room` bytes when given: a READ
        too small for the file leaves it kept); None: not kept."""
        if not self._items:
            return None
        with self._lock:
            data = self._items.get(ino)
            if data is None or len(data) > room >= 0:
                return None
            del self._items[ino]
            self.size -= len(data)
            self.hits += 1
            return data

    def clear(self) -> bool:
        """Drop what is kept (an idle mount's trim); whether anything was."""
        with self._lock:
            held = bool(self._items)
            self._items.clear()
            self.size = 0
            return held
