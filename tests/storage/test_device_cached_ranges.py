"""READs of chunks that are ready in the blob cache (`BlobDevice.read`, the /dev/fuse path) read
exactly their range from the cache's data file, and a read that misses the page cache has the
kernel read in the chunk around it (`BlobCacheManager._preadv_cold`). Before, each READ read its
whole chunk from the data file: a 4 KiB random READ cost a 1 MiB read and copy, and with the page
cache dropped each one was a small disk read of its own (bench_fusedev's cold random reads over a
complete blob cache: 0.77 s against 0.29 s decoding chunks from the local blob)."""

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from nydus_py.rafs import open_bootstrap
from nydus_py.storage.cache import BlobCacheManager
from nydus_py.storage.cache import blobcache as blobcache_mod
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.storage.prefetch import resolve_path

from . import images


@pytest.fixture
def cached(tmp_path: Path) -> Any:
    img = images.build(tmp_path / "img")
    image = open_bootstrap(str(img.boot))
    cache = BlobCacheManager(str(tmp_path / "cache"), LocalBlobDir(str(img.blob_dir)), amplify_io=0, read_around=0)
    dev = BlobDevice(image, cache, validate=False)
    big = resolve_path(image, b"/big/c.bin")
    want = img.files["big/c.bin"]
    assert dev.read(big, 0, len(want)) == want  # every chunk of the file fetched into the cache
    cache.flush()
    try:
        yield dev, cache, big, want
    finally:
        cache.close()
        image.close()


def _cache_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes asked of the data files by each read of the blob cache."""
    sizes: list[int] = []
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd: int, n: int, off: int) -> bytes:
        sizes.append(n)
        return real_pread(fd, n, off)

    def preadv(fd: int, bufs: list[memoryview], off: int, *flags: int) -> int:
        sizes.append(sum(len(b) for b in bufs))
        return real_preadv(fd, bufs, off, *flags)

    monkeypatch.setattr(blobcache_mod.os, "pread", pread)
    monkeypatch.setattr(blobcache_mod.os, "preadv", preadv)
    return sizes


def test_a_read_of_ready_chunks_reads_only_its_range(cached: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    dev, cache, big, want = cached
    sizes = _cache_reads(monkeypatch)
    at = images.CHUNK + 5000
    assert bytes(dev.read(big, at, 100)) == want[at:at + 100]
    assert sum(sizes) <= 2 * 100, sizes  # (one RWF_NOWAIT try, maybe one plain read); not the chunk
    assert cache.stats.direct_reads >= 1
    # across a chunk boundary: both pieces, one preadv (contiguous in the data file)
    sizes.clear()
    at = 2 * images.CHUNK - 50
    assert bytes(dev.read(big, at, 100)) == want[at:at + 100]
    assert sum(sizes) <= 2 * 100, sizes


def test_a_read_missing_the_page_cache_reads_in_its_chunk(cached: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page cache miss is what RWF_NOWAIT says (simulated here: a real miss's own read can
    start the kernel's readahead and finish before the test looks); the kernel is then asked to
    read in the whole chunk (WILLNEED), and the read is served by a plain read."""
    dev, cache, big, want = cached
    chunk = dev.image.chunks(big, 3 * images.CHUNK, 1)[0]
    advised: list[tuple[int, int, int]] = []
    misses = [1]
    real_preadv, real_fadvise = os.preadv, os.posix_fadvise

    def preadv(fd: int, bufs: list[memoryview], off: int, *flags: int) -> int:
        if flags and flags[0] & os.RWF_NOWAIT and misses:
            misses.pop()
            raise BlockingIOError(errno.EAGAIN, "not in the page cache")
        return real_preadv(fd, bufs, off, *flags)

    def fadvise(fd: int, off: int, n: int, advice: int) -> None:
        advised.append((off, n, advice))
        real_fadvise(fd, off, n, advice)

    monkeypatch.setattr(blobcache_mod.os, "preadv", preadv)
    monkeypatch.setattr(blobcache_mod.os, "posix_fadvise", fadvise)
    at = 3 * images.CHUNK + 8192
    assert bytes(dev.read(big, at, 4096)) == want[at:at + 4096]
    assert advised == [(chunk.uncompressed_offset, chunk.uncompressed_size, os.POSIX_FADV_WILLNEED)]
    assert cache.stats.cold_fault_arounds == 1
    # the next read of that chunk finds it in the page cache: nothing asked again
    at2 = 3 * images.CHUNK + 40000
    assert bytes(dev.read(big, at2, 4096)) == want[at2:at2 + 4096]
    assert len(advised) == 1 and cache.stats.cold_fault_arounds == 1


def test_a_big_chunk_is_read_in_around_the_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks bigger than `_FAULT_AROUND` (a --chunk-size of several MiB): a window of that
    size around the read, not the whole chunk."""
    monkeypatch.setattr(blobcache_mod, "_FAULT_AROUND", 16384)
    img = images.build(tmp_path / "img")
    image = open_bootstrap(str(img.boot))
    cache = BlobCacheManager(str(tmp_path / "cache"), LocalBlobDir(str(img.blob_dir)), amplify_io=0, read_around=0)
    try:
        dev = BlobDevice(image, cache, validate=False)
        big = resolve_path(image, b"/big/c.bin")
        want = img.files["big/c.bin"]
        assert dev.read(big, 0, len(want)) == want
        chunk = image.chunks(big, images.CHUNK, 1)[0]
        advised: list[tuple[int, int]] = []
        real_preadv = os.preadv

        def preadv(fd: int, bufs: list[memoryview], off: int, *flags: int) -> int:
            if flags and flags[0] & os.RWF_NOWAIT:
                raise BlockingIOError(errno.EAGAIN, "not in the page cache")
            return real_preadv(fd, bufs, off, *flags)

        monkeypatch.setattr(blobcache_mod.os, "preadv", preadv)
        monkeypatch.setattr(blobcache_mod.os, "posix_fadvise", lambda fd, off, n, adv: advised.append((off, n)))
        at = images.CHUNK + 30000
        assert bytes(dev.read(big, at, 4096)) == want[at:at + 4096]
        base = chunk.uncompressed_offset
        (off, n), = advised
        assert n == 16384 and base <= off <= base + 30000 <= base + 30000 + 4096 <= off + n
    finally:
        cache.close()
        image.close()
