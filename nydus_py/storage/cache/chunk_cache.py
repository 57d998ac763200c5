"""A size-bounded in-memory cache of decoded chunks with single-flight loading.

Concurrent readers of the same chunk wait for one fetch+decompress instead of repeating it; a
failed load is not cached, so the next reader retries. An entry may be a prefix of its chunk
(a random reader's partial decode, see BlobDevice): a reader that needs more loads again.

The bytes live in a `ChunkStore` (one LRU, size, lock and loading map); a `ChunkCache` is a
view of a store whose keys are prefixed by the view's serial, so two images' equal keys never
meet. A daemon's mounts share one process-wide store (`ChunkCache.shared`): one memory budget,
not one per image (a per-image budget multiplies in a shared daemon with many images). That
budget is the largest `chunk_cache_size` any live shared view asked for (DEFAULT_BUDGET when
none is open): a mount cannot shrink it under another's request. Closing (or collecting) a view
drops its entries; `clear` drops them too but keeps the view usable (the idle trimmer's).
"""

import collections
import itertools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable

DEFAULT_BUDGET = 128 << 20

_serials = itertools.count(1)


class _Load:
    """One load under way. Most loads have no waiter, so the event a waiter sleeps on is made
    only when one comes (under the store's lock, while the load is still listed: the owner,
    which unlists it under the same lock, then sees the event and sets it). A
    concurrent.futures.Future cost ~4.6 us per load here, this ~0.5 us."""

    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.event: threading.Event | None = None


class ChunkStore:
    """The entries of all views of one budget; keys are (view serial, view key)."""

    def __init__(self, capacity_bytes: int | None = None) -> None:
        # fixed: a private store's capacity; None: the largest live view's request
        self._fixed = capacity_bytes
        self.size = 0
        self._data: OrderedDict[tuple[int, Hashable], bytes] = OrderedDict()
        self._loading: dict[tuple[int, Hashable], _Load] = {}
        self._held: dict[int, int] = {}  # view serial -> bytes of its entries
        self._asked: dict[int, int] = {}  # live view serial -> capacity it asked for
        self.lock = threading.Lock()
        # serials of views collected without close(): their finalizer may run inside any
        # allocation, also one under the lock, so it only queues them for the next locked call
        self._orphans: collections.deque[int] = collections.deque()
        self.capacity = self._budget()

    def _budget(self) -> int:
        """(Kept in `capacity`, set under the lock: readers look at it without the lock.)"""
        if self._fixed is not None:
            return self._fixed
        return max(self._asked.values(), default=DEFAULT_BUDGET)

    def entries(self) -> int:
        with self.lock:
            self._reap()
            return len(self._data)

    def held(self, serial: int) -> int:
        with self.lock:
            return self._held.get(serial, 0)

    def _open(self, serial: int, asked: int) -> None:
        with self.lock:
            self._reap()
            self._asked[serial] = asked
            self._held[serial] = 0
            self.capacity = self._budget()

    def _put(self, key: tuple[int, Hashable], data: bytes) -> bytes:
        """Hold `data` for `key` (or a longer prefix held meanwhile) and evict down to the
        budget; the bytes the readers get. Under the lock."""
        self._reap()
        old = self._data.pop(key, None)
        serial = key[0]
        if old is not None:
            self.size -= len(old)
            self._held[serial] -= len(old)
            if len(old) > len(data):
                data = old  # (a longer prefix came in meanwhile: keep it)
        if serial in self._held and len(data) <= self.capacity:
            self._data[key] = data
            self.size += len(data)
            self._held[serial] += len(data)
            self._evict()
        return data

    def _evict(self) -> None:
        cap = self.capacity
        while self.size > cap:
            (serial, _k), gone = self._data.popitem(last=False)
            self.size -= len(gone)
            self._held[serial] -= len(gone)

    def _orphan(self, serial: int) -> None:
        self._orphans.append(serial)

    def _reap(self) -> None:
        """Close the views collected without close(). Under the lock."""
        while self._orphans:
            self._forget(self._orphans.popleft(), close=True)

    def _drop(self, serial: int, *, close: bool) -> None:
        with self.lock:
            self._reap()
            self._forget(serial, close=close)

    def _forget(self, serial: int, *, close: bool) -> None:
        """Forget `serial`'s entries (and, closing, its request on the budget). Under the lock."""
        for key in [k for k in self._data if k[0] == serial]:
            self.size -= len(self._data.pop(key))
        if close:
            self._held.pop(serial, None)
            self._asked.pop(serial, None)
            self.capacity = self._budget()
            self._evict()  # (the budget may have shrunk)
        elif serial in self._held:
            self._held[serial] = 0


_SHARED = ChunkStore()


class ChunkCache:
    """One image's view of a ChunkStore: `ChunkCache(n)` owns a private store of n bytes (as
    before stores were shared); `ChunkCache.shared(n)` views the daemon's process-wide one."""

    def __init__(self, capacity_bytes: int = 64 << 20, *, store: ChunkStore | None = None) -> None:
        self.store = store if store is not None else ChunkStore(capacity_bytes)
        self.serial = next(_serials)
        self.hits = 0
        self.misses = 0
        self.passed = 0  # loads handed to their readers without being kept (get(hold=False))
        self.store._open(self.serial, capacity_bytes)
        self._finalizer = weakref.finalize(self, self.store._orphan, self.serial)

    @classmethod
    def shared(cls, capacity_bytes: int = DEFAULT_BUDGET) -> "ChunkCache":
        """A view of the process-wide store, asking for a budget of `capacity_bytes`."""
        return cls(capacity_bytes, store=_SHARED)

    @property
    def capacity(self) -> int:
        """The budget of the store (shared with the other views of a shared store)."""
        return self.store.capacity

    @property
    def size(self) -> int:
        """Bytes held in the store (by all its views: what decides room before evicting)."""
        return self.store.size

    @property
    def held(self) -> int:
        """Bytes held for this view."""
        return self.store.held(self.serial)

    def get(self, key: Hashable, load: Callable[[], bytes], need: int = 0, hold: bool = True) -> bytes:
        """The held bytes of `key` when they are at least `need` long, else `load()`'s (which
        replace a shorter held prefix). Concurrent misses share one load; a waiter whose
        shared load came out too short loads again. `hold=False`: a load is handed to its
        readers (and waiters) but not kept (counted in `passed`): the caller's reader takes
        the whole chunk at once, and keeping a copy only costs fresh pages."""
        store = self.store
        skey = (self.serial, key)
        while True:
            with store.lock:
                data = store._data.get(skey)
                if data is not None and len(data) >= need:
                    store._data.move_to_end(skey)
                    self.hits += 1
                    return data
                pending = store._loading.get(skey)
                if pending is None:
                    pending = store._loading[skey] = _Load()
                    self.misses += 1
                    owner = True
                else:
                    owner = False
                    if pending.event is None:
                        pending.event = threading.Event()
                    event = pending.event
            if not owner:
                event.wait()
                if pending.error is not None:
                    raise pending.error
                data = pending.data
                assert data is not None
                if len(data) >= need:
                    return data
                continue
            try:
                data = load()
            except BaseException as e:
                with store.lock:
                    del store._loading[skey]
                    pending.error = e
                    done = pending.event
                if done is not None:
                    done.set()
                raise
            with store.lock:
                del store._loading[skey]
                if hold:
                    data = store._put(skey, data)
                else:
                    self.passed += 1
                pending.data = data
                done = pending.event
            if done is not None:
                done.set()
            return data

    def peek(self, key: Hashable, need: int = 0) -> bytes | None:
        """The chunk (or a prefix of it at least `need` long) when it is held now; never loads
        (and counts neither hit nor miss)."""
        with self.store.lock:
            data = self.store._data.get((self.serial, key))
        return data if data is not None and len(data) >= need else None

    def loading(self, key: Hashable) -> bool:
        """Whether a load of `key` is under way (another reader will have it soon)."""
        with self.store.lock:
            return (self.serial, key) in self.store._loading

    def discard(self, key: Hashable) -> bool:
        """Drop `key`'s held bytes (a load under way is not touched); whether any were held."""
        store = self.store
        with store.lock:
            gone = store._data.pop((self.serial, key), None)
            if gone is None:
                return False
            store.size -= len(gone)
            if self.serial in store._held:
                store._held[self.serial] -= len(gone)
        return True

    def clear(self) -> None:
        """Drop this view's entries (it stays usable)."""
        self.store._drop(self.serial, close=False)

    def close(self) -> None:
        """Drop this view's entries and its request on the store's budget; later loads are
        served but not held."""
        if self._finalizer.detach() is not None:
            self.store._drop(self.serial, close=True)
