"""A size-bounded in-memory cache of decoded chunks with single-flight loading.

Concurrent readers of the same chunk wait for one fetch+decompress instead of repeating it; a
failed load is not cached, so the next reader retries. An entry may be a prefix of its chunk
(a random reader's partial decode, see BlobDevice): a reader that needs more loads again.
"""

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future


class ChunkCache:
    def __init__(self, capacity_bytes: int = 64 << 20) -> None:
        self.capacity = capacity_bytes
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[Hashable, bytes] = OrderedDict()
        self._loading: dict[Hashable, Future[bytes]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], bytes], need: int = 0) -> bytes:
        """The held bytes of `key` when they are at least `need` long, else `load()`'s (which
        replace a shorter held prefix). Concurrent misses share one load; a waiter whose
        shared load came out too short loads again."""
        while True:
            with self._lock:
                data = self._data.get(key)
                if data is not None and len(data) >= need:
                    self._data.move_to_end(key)
                    self.hits += 1
                    return data
                fut = self._loading.get(key)
                owner = fut is None
                if fut is None:
                    fut = Future()
                    self._loading[key] = fut
                    self.misses += 1
            if not owner:
                data = fut.result()
                if len(data) >= need:
                    return data
                continue
            try:
                data = load()
            except BaseException as e:
                with self._lock:
                    del self._loading[key]
                fut.set_exception(e)
                raise
            with self._lock:
                del self._loading[key]
                old = self._data.pop(key, None)
                if old is not None:
                    self.size -= len(old)
                if old is not None and len(old) > len(data):
                    data = old  # (a longer prefix came in meanwhile: keep it)
                if len(data) <= self.capacity:
                    self._data[key] = data
                    self.size += len(data)
                    while self.size > self.capacity:
                        _k, gone = self._data.popitem(last=False)
                        self.size -= len(gone)
            fut.set_result(data)
            return data

    def peek(self, key: Hashable, need: int = 0) -> bytes | None:
        """The chunk (or a prefix of it at least `need` long) when it is held now; never loads
        (and counts neither hit nor miss)."""
        with self._lock:
            data = self._data.get(key)
        return data if data is not None and len(data) >= need else None

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.size = 0
