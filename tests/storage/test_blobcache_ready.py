"""Range-level readiness of the blob cache (`chunks_ready`, `BlobDevice.range_ready`): the cheap
hint a transport asks before a READ to choose whether the reading thread may answer it itself.
Ready means every chunk of the range is marked in the chunk map (its bytes written); a chunk
still being fetched is not ready, so its READ is handed off."""

import threading

from nydus_py.rafs import open_bootstrap
from nydus_py.storage.cache import BlobCacheManager
from nydus_py.storage.cache.chunk_map import ChunkMap
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.storage.prefetch import resolve_path

from . import images
from .synth import FakeSource, make_blob


def test_ready_follows_the_chunk_map(tmp_path) -> None:  # noqa: ANN001
    b = make_blob(8, seed=11)
    src = FakeSource().add(b)
    m = BlobCacheManager(str(tmp_path / "cache"), src)
    try:
        assert not m.chunks_ready(b.info, [b.chunks[0]])  # nothing fetched (the blob opened for it)
        assert m.read_chunks(b.info, b.chunks[2:4]) == b.plain[2:4]
        assert m.chunks_ready(b.info, b.chunks[2:4])
        assert not m.chunks_ready(b.info, b.chunks[2:5])  # one chunk of the range is missing
        assert m.chunks_ready(b.info, [])
        reads = src.reads()
        assert m.chunks_ready(b.info, [b.chunks[3]]) and src.reads() == reads  # never fetches
        m.flush()
    finally:
        m.close()
    # a restarted daemon: the map on disk says so before any read opened the blob
    m2 = BlobCacheManager(str(tmp_path / "cache"), FakeSource(fail=1000))
    try:
        assert m2.chunks_ready(b.info, b.chunks[2:4])
        assert not m2.chunks_ready(b.info, [b.chunks[5]])
    finally:
        m2.close()


def test_a_chunk_being_fetched_is_not_ready_until_stored(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    b = make_blob(8, seed=12)
    gate = threading.Event()
    src = FakeSource(gate=gate).add(b)
    m = BlobCacheManager(str(tmp_path / "cache"), src, amplify_io=0, read_around=0)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(m.read_chunks(b.info, [b.chunks[3]])))
    try:
        reader.start()
        src.wait_inside(demand=1, what="the fetch of chunk 3")
        assert not m.chunks_ready(b.info, [b.chunks[3]])  # claimed, in flight: its READ may wait
        # fetched and written, not yet marked: still not ready (the mark comes after the write)
        marked = threading.Event()
        mark = ChunkMap.mark

        def slow_mark(self, indices, generation=None):  # noqa: ANN001, ANN202
            assert not m.chunks_ready(b.info, [b.chunks[3]])
            marked.set()
            return mark(self, indices, generation)

        monkeypatch.setattr(ChunkMap, "mark", slow_mark)
        gate.set()
        reader.join(10)
        assert not reader.is_alive() and got == [b.plain[3]] and marked.is_set()
        assert m.chunks_ready(b.info, [b.chunks[3]])
    finally:
        gate.set()
        reader.join(10)
        m.close()


def test_device_range_ready_through_a_blob_cache_and_the_chunk_cache(tmp_path) -> None:  # noqa: ANN001
    img = images.build(tmp_path / "img")
    image = open_bootstrap(str(img.boot))
    cache = BlobCacheManager(str(tmp_path / "cache"), LocalBlobDir(str(img.blob_dir)), amplify_io=0, read_around=0)
    plain = LocalBlobDir(str(img.blob_dir))
    try:
        for dev, kept in ((BlobDevice(image, cache, validate=False), True),
                          (BlobDevice(image, plain, validate=False), False)):
            big = resolve_path(image, b"/big/c.bin")
            small = resolve_path(image, b"/small/f03")
            other = resolve_path(image, b"/small/f04")
            chunk = images.CHUNK
            assert not dev.range_ready(small, 0, 4096)
            assert dev.read(small, 0, 4096) == img.files["small/f03"][:4096]
            # the blob cache keeps what it fetched; the chunk cache does not keep a chunk a READ
            # took whole (a small file: the page cache holds it now), so its READ would load again
            assert dev.range_ready(small, 0, 4096) is kept
            assert not dev.range_ready(other, 0, 4096)
            assert dev.read(big, chunk, 100) == img.files["big/c.bin"][chunk:chunk + 100]
            assert dev.range_ready(big, chunk + 5000, 4096)  # within the chunk read
            assert not dev.range_ready(big, chunk - 10, 4096)  # straddles a chunk not read
            assert dev.range_ready(big, 100 * chunk, 4096)  # past the end: nothing to wait for
    finally:
        cache.close()
        plain.close()
        image.close()


def test_a_read_after_its_readiness_check_decodes_its_chunk_records_once(tmp_path) -> None:  # noqa: ANN001
    """A READ asks `range_ready` (read_waits), then reads (maybe a nowait try and a blocking one):
    the chunk records of its range are decoded once, and another range is decoded afresh."""
    img = images.build(tmp_path / "img")
    image = open_bootstrap(str(img.boot))
    cache = BlobCacheManager(str(tmp_path / "cache"), LocalBlobDir(str(img.blob_dir)), amplify_io=0, read_around=0)
    calls: list[tuple[int, int, int | None]] = []
    real = image.chunks

    def counting(ino: int, offset: int = 0, size: int | None = None):  # noqa: ANN202
        calls.append((ino, offset, size))
        return real(ino, offset, size)

    image.chunks = counting  # type: ignore[method-assign]
    try:
        dev = BlobDevice(image, cache, validate=False)
        small = resolve_path(image, b"/small/f03")
        other = resolve_path(image, b"/small/f04")
        want = img.files["small/f03"]
        assert dev.read(small, 0, 1 << 20) == want  # fetched into the blob cache (another range)
        calls.clear()
        assert dev.range_ready(small, 0, 4096)
        mem = bytearray(4096)
        assert dev.read_ready_into(small, 0, 4096, len(want), [memoryview(mem)]) == min(4096, len(want))
        assert dev.read_ready_into(small, 0, 4096, len(want), [memoryview(mem)], nowait=True) == min(4096, len(want))
        assert bytes(mem[: len(want)]) == want[:4096]
        assert calls == [(small, 0, 4096)]
        assert not dev.range_ready(other, 0, 4096) and calls[-1] == (other, 0, 4096)
        assert dev.read_cached(small, 0, 4096, len(want)) == want[:4096]  # the other range came between
        assert calls[-1] == (small, 0, 4096) and len(calls) == 3
    finally:
        cache.close()
        image.close()
