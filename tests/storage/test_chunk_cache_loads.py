"""ChunkCache's single-flight loads: concurrent misses of one key share one load, its error
reaches every waiter and is not cached, and a waiter whose shared load is too short for it
loads again. The waiters block on the owner's load, released by the test, never by time."""

import threading
from collections.abc import Callable

from nydus_py.storage.cache.chunk_cache import ChunkCache

from ..waiting import wait_until

WAITERS = 3


def _blocked_load(result: Callable[[], bytes]) -> tuple[Callable[[], bytes], threading.Event, threading.Event, list[int]]:
    """A load that signals it started, then waits for the test's go; and its call count."""
    started, go, calls = threading.Event(), threading.Event(), [0]

    def load() -> bytes:
        calls[0] += 1
        started.set()
        assert go.wait(10), "the test never released the load"
        return result()

    return load, started, go, calls


def _waiters(cache: ChunkCache, key: str, need: int, load: Callable[[], bytes]) -> tuple[list[threading.Thread], list[object]]:
    out: list[object] = []

    def get() -> None:
        try:
            out.append(cache.get(key, load, need))
        except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
            out.append(e)

    threads = [threading.Thread(target=get) for _ in range(WAITERS)]
    for t in threads:
        t.start()
    return threads, out


def _loading_has_waiter(cache: ChunkCache, key: str) -> bool:
    pending = cache.store._loading.get((cache.serial, key))
    return pending is not None and pending.event is not None


def _share_one_load(cache: ChunkCache, result: Callable[[], bytes]) -> tuple[list[object], list[int]]:
    """WAITERS readers miss `k` at once; the owner's load is released only once another reader
    waits on it. (What each reader got, the load's call count.)"""
    load, started, go, calls = _blocked_load(result)
    threads, got = _waiters(cache, "k", 0, load)
    assert started.wait(10)
    wait_until(lambda: _loading_has_waiter(cache, "k"), what="a second reader waiting on the load")
    go.set()
    for t in threads:
        t.join(10)
    return got, calls


def test_concurrent_misses_share_one_load() -> None:
    cache = ChunkCache(1 << 20)
    got, calls = _share_one_load(cache, lambda: b"x" * 100)
    assert got == [b"x" * 100] * WAITERS and calls == [1]
    assert cache.get("k", lambda: b"other") == b"x" * 100 and calls == [1]  # held now: a hit
    assert cache.misses == 1


def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    cache = ChunkCache(1 << 20)

    def fail() -> bytes:
        raise OSError(5, "chunk digest mismatch")

    got, _calls = _share_one_load(cache, fail)
    # the waiters get the owner's error; a reader that came after it loads (and fails) again
    assert len(got) == WAITERS and all(isinstance(g, OSError) and "digest mismatch" in str(g) for g in got)
    assert not cache.loading("k")
    assert cache.get("k", lambda: b"again") == b"again"  # the failure was not kept


def test_a_waiter_whose_shared_load_is_too_short_loads_again() -> None:
    cache = ChunkCache(1 << 20)
    load, started, go, calls = _blocked_load(lambda: b"p" * 10)  # a partial decode: a 10-byte prefix
    owner = threading.Thread(target=cache.get, args=("k", load, 0))
    owner.start()
    assert started.wait(10)
    got: list[bytes] = []
    longer = threading.Thread(target=lambda: got.append(cache.get("k", lambda: b"q" * 50, 40)))
    longer.start()
    wait_until(lambda: _loading_has_waiter(cache, "k"), what="the longer reader waiting on the load")
    go.set()
    owner.join(10)
    longer.join(10)
    assert got == [b"q" * 50] and calls == [1]
    assert cache.peek("k", 40) == b"q" * 50  # the longer load replaced the short prefix


def test_loads_without_waiters_make_no_event() -> None:
    """The common case (nobody waits) allocates nothing to wake."""
    cache = ChunkCache(1 << 20)
    seen: list[object] = []

    def load() -> bytes:
        seen.append(cache.store._loading[(cache.serial, "k")].event)
        return b"z"

    assert cache.get("k", load) == b"z" and seen == [None]
