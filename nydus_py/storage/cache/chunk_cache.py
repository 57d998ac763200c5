"""A size-bounded in-memory cache of decoded chunks with single-flight loading.

Concurrent readers of the same chunk wait for one fetch+decompress instead of repeating it; a
failed load is not cached, so the next reader retries.
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

    def get(self, key: Hashable, load: Callable[[], bytes]) -> bytes:
        with self._lock:
            data = self._data.get(key)
            if data is not None:
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
            return fut.result()
        try:
            data = load()
        except BaseException as e:
            with self._lock:
                del self._loading[key]
            fut.set_exception(e)
            raise
        with self._lock:
            del self._loading[key]
            if len(data) <= self.capacity:
                self._data[key] = data
                self.size += len(data)
                while self.size > self.capacity:
                    _k, old = self._data.popitem(last=False)
                    self.size -= len(old)
        fut.set_result(data)
        return data

    def peek(self, key: Hashable) -> bytes | None:
        """The chunk when it is held now; never loads (and counts neither hit nor miss)."""
        with self._lock:
            return self._data.get(key)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.size = 0
