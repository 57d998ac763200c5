"""One decoded-chunk budget for all mounts of a daemon (issue 12): views of a shared store
never see each other's entries, fill one LRU together, and give their bytes back on close."""

import gc
import json
import threading
from pathlib import Path

from nydus_py.storage.cache.chunk_cache import DEFAULT_BUDGET, ChunkCache, ChunkStore

from ..fs.mountrig import build


def _views(capacity: int) -> tuple[ChunkStore, ChunkCache, ChunkCache]:
    store = ChunkStore()
    return store, ChunkCache(capacity, store=store), ChunkCache(capacity, store=store)


def test_two_views_never_see_each_others_entries_for_equal_keys() -> None:
    _store, a, b = _views(1000)
    assert a.get("k", lambda: b"A" * 10) == b"A" * 10
    assert b.peek("k") is None
    assert b.get("k", lambda: b"B" * 10) == b"B" * 10
    assert a.get("k", lambda: b"x") == b"A" * 10 and b.get("k", lambda: b"x") == b"B" * 10
    assert (a.hits, a.misses, b.hits, b.misses) == (1, 1, 1, 1)


def test_views_share_one_budget_and_the_oldest_goes_first() -> None:
    store, a, b = _views(300)
    a.get(1, lambda: bytes(100))
    a.get(2, lambda: bytes(100))
    b.get(1, lambda: bytes(100))
    assert store.size == 300 and a.capacity == b.capacity == 300
    b.get(2, lambda: bytes(100))  # over the one budget: A's oldest entry goes
    assert a.peek(1) is None and a.peek(2) is not None
    assert (a.held, b.held, store.size, store.entries()) == (100, 200, 300, 3)


def test_closing_a_view_drops_its_entries_and_frees_its_bytes() -> None:
    store, a, b = _views(1000)
    a.get(1, lambda: bytes(100))
    b.get(1, lambda: bytes(50))
    a.close()
    assert (store.size, store.entries(), b.held) == (50, 1, 50)
    assert a.get(1, lambda: bytes(7)) == bytes(7) and store.size == 50  # served, not held
    b.clear()
    assert (store.size, b.held, b.peek(1)) == (0, 0, None)
    b.get(2, lambda: bytes(5))  # a cleared view stays usable
    assert b.held == 5


def test_the_budget_is_the_largest_live_request() -> None:
    store = ChunkStore()
    assert store.capacity == DEFAULT_BUDGET
    small = ChunkCache(100, store=store)
    big = ChunkCache(300, store=store)
    assert small.capacity == 300
    small.get(1, lambda: bytes(150))
    big.get(1, lambda: bytes(150))
    big.close()  # the budget falls back to 100: evicted down to it
    assert small.capacity == 100 and store.size == 0
    small.get(2, lambda: bytes(50))
    del small
    gc.collect()
    assert store.entries() == 0  # a collected view gives back its entries and its request
    assert store.capacity == DEFAULT_BUDGET


def test_a_private_cache_keeps_its_own_capacity() -> None:
    a, b = ChunkCache(100), ChunkCache(100)
    a.get(1, lambda: bytes(100))
    b.get(1, lambda: bytes(100))
    assert a.store is not b.store and a.size == b.size == 100


def test_mounted_images_share_the_daemons_chunk_cache(tmp_path: Path) -> None:
    from nydus_py.daemon.instance import MountCmd, create_instance

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"y" * 5000)
    img = build(str(src), str(tmp_path / "img"), views=False)
    cfg = json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": img.blob_dir}}},
                      "mode": "direct"})
    one = create_instance("/m1", MountCmd("rafs", img.boot, cfg))
    two = create_instance("/m2", MountCmd("rafs", img.boot, cfg))
    try:
        assert one.device is not None and two.device is not None and one.image is not None
        store = one.device.cache.store
        assert store is two.device.cache.store and one.device.cache.capacity == DEFAULT_BUDGET
        before = store.size
        ino = one.image.lookup(one.image.root_ino, b"f")
        assert ino is not None
        # (a part of the file's one chunk: a READ taking a chunk whole does not keep it)
        assert one.device.read(ino, 0, 4000) == b"y" * 4000
        assert two.device.read(ino, 0, 4000) == b"y" * 4000  # the same key, its own entry
        assert one.device.cache.held == two.device.cache.held > 0
        assert store.size == before + 2 * one.device.cache.held
        assert two.trim()  # an idle mount gives its decoded chunks back
        assert two.device.cache.held == 0 and one.device.cache.held > 0
        one.close()
        assert store.size == before
    finally:
        one.close()
        two.close()


def test_a_view_collected_under_the_stores_lock_does_not_deadlock() -> None:
    """A finalizer may run inside any allocation, also one made under the store's lock."""
    store = ChunkStore()
    view: list[ChunkCache] = [ChunkCache(100, store=store)]
    view[0].get(1, lambda: bytes(10))

    def collect_under_the_lock() -> None:
        with store.lock:
            view.clear()
            gc.collect()

    t = threading.Thread(target=collect_under_the_lock, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the collected view's finalizer waited on the store's lock"
    assert store.entries() == 0 and store.size == 0
