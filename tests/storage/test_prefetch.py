"""Prefetch into the blob cache: table hints, --prefetch-files, prefetch_all, the bandwidth cap,
and on-demand reads that never wait behind prefetch."""

import threading
import time

import pytest

from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.model import BlobInfo
from nydus_py.storage.cache import BlobCacheManager
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.storage.prefetch import Prefetcher, TokenBucket, read_prefetch_list, resolve_path

from . import images


class SlowDir(LocalBlobDir):
    """localfs with a fixed latency per request (like a far registry), counting requests."""

    def __init__(self, path: str, delay: float) -> None:
        super().__init__(path)
        self.delay = delay
        self.calls: list[tuple[float, int, int, bool]] = []
        self.lock = threading.Lock()

    def _slow(self, blob: BlobInfo, offset: int, size: int, prefetch: bool) -> bytes:
        with self.lock:
            self.calls.append((time.monotonic(), offset, size, prefetch))
        time.sleep(self.delay)
        return super().read(blob, offset, size)

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        return self._slow(blob, offset, size, False)

    def read_prefetch(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        return self._slow(blob, offset, size, True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return images.build(tmp_path_factory.mktemp("pf"), seed=21, prefetch=[b"/etc", b"/big/a.bin"])


def chunk_set(image, paths):
    out = set()
    for p in paths:
        out |= {c.index for c in image.chunks(resolve_path(image, p))}
    return out


def ready_set(cache, image):
    blob = image.blobs[0]
    import os

    from nydus_py.storage.cache import ChunkMap

    cache.flush()  # the bits reach the file in batches (a no-op once closed)
    cm = ChunkMap(os.path.join(cache.work_dir, f"{blob.blob_id}.blob.data.chunk_map"), blob.chunk_count)
    try:
        return {i for i in range(blob.chunk_count) if cm.is_ready(i)}
    finally:
        cm.close()


def run(built, tmp_path, source=None, **kw):
    image = open_bootstrap(str(built.boot))
    cache = BlobCacheManager(str(tmp_path / "cache"), source or LocalBlobDir(str(built.blob_dir)))
    pf = Prefetcher(image, cache, **kw).start()
    assert pf.wait(60)
    return image, cache, pf


def test_prefetch_table(built, tmp_path):
    image, cache, pf = run(built, tmp_path, threads=2)
    assert image.prefetch_table()  # the builder wrote the hints
    want = chunk_set(image, [b"/etc/passwd", b"/etc/motd", b"/big/a.bin"])
    assert ready_set(cache, image) == want
    assert pf.errors == 0 and pf.chunks_fetched == len(want)
    assert cache.stats.prefetch_requests_count >= 1 and cache.stats.prefetch_data_amount > 0


def test_prefetch_files_override_table(built, tmp_path):
    lst = tmp_path / "list"
    lst.write_text("/big/c.bin\n\n  /small/f03  \n/does/not/exist\n/etc/passwd/x\n")
    files = read_prefetch_list(str(lst))
    assert files == [b"/big/c.bin", b"/small/f03", b"/does/not/exist", b"/etc/passwd/x"]
    image, cache, pf = run(built, tmp_path, files=files)
    assert ready_set(cache, image) == chunk_set(image, [b"/big/c.bin", b"/small/f03"])


def test_prefetch_all_then_reads_hit(built, tmp_path):
    image, cache, pf = run(built, tmp_path, prefetch_all=True, threads=3, merging_size=128 << 10)
    assert cache.data_all_ready()
    reads = cache.stats.backend_reads
    dev = BlobDevice(image, cache)
    for rel, data in built.files.items():
        assert dev.read(resolve_path(image, b"/" + rel.encode()), 0, len(data)) == data
    assert cache.stats.backend_reads == reads


def test_token_bucket():
    t = [0.0]
    b = TokenBucket(1000, clock=lambda: t[0])
    assert b.delay_for(500) == 0.0
    assert b.delay_for(500) == pytest.approx(0.5)
    assert b.delay_for(1000) == pytest.approx(1.0)
    t[0] = 10.0
    assert b.delay_for(100) == 0.0
    assert TokenBucket(0).delay_for(1 << 30) == 0.0


def test_bandwidth_cap(built, tmp_path):
    rate = 400_000
    t = time.monotonic()
    image, cache, pf = run(built, tmp_path, files=[b"/big/a.bin", b"/big/b.bin"], bandwidth=rate,
                           merging_size=64 << 10, threads=4)
    took = time.monotonic() - t
    total = cache.stats.prefetch_data_amount
    assert total > 600_000
    assert took >= 0.8 * (total - (64 << 10) * 2) / rate
    t = time.monotonic()
    run(built, tmp_path / "uncapped", files=[b"/big/a.bin", b"/big/b.bin"], merging_size=64 << 10, threads=4)
    assert time.monotonic() - t < took / 2


def test_on_demand_not_queued_behind_prefetch(built, tmp_path):
    delay = 0.15
    src = SlowDir(str(built.blob_dir), delay)
    image = open_bootstrap(str(built.boot))
    cache = BlobCacheManager(str(tmp_path / "cache"), src, amplify_io=0)
    pf = Prefetcher(image, cache, prefetch_all=True, use_table=False, threads=2, merging_size=64 << 10).start()
    time.sleep(delay * 2.5)  # prefetch is busy
    assert not pf.done.is_set()
    dev = BlobDevice(image, cache)
    ino = resolve_path(image, b"/text/log.txt")
    t = time.monotonic()
    data = dev.read(ino, 300_000, 100)
    took = time.monotonic() - t
    assert data == built.files["text/log.txt"][300_000:300_100]
    # one request of its own, plus at most the prefetch fetches already in flight when it came
    assert took < delay * 3.5, took
    remaining_prefetch = sum(1 for c in src.calls if c[3])
    pf.wait(60)
    assert sum(1 for c in src.calls if c[3]) > remaining_prefetch  # prefetch was still going
    assert any(not c[3] for c in src.calls)


def test_scattered_files_are_fetched_in_parallel(built, tmp_path):
    """Each batch is one ranged read of adjacent chunks: files scattered in the blob become
    separate batches that the workers send side by side (not one worker's queue of reads)."""
    delay = 0.2
    src = SlowDir(str(built.blob_dir), delay)
    image = open_bootstrap(str(built.boot))
    files = [b"/small/f03", b"/small/f11", b"/small/f19", b"/small/f27"]
    runs = {tuple(c.compressed_offset for c in image.chunks(resolve_path(image, f))) for f in files}
    assert len(runs) == 4
    cache = BlobCacheManager(str(tmp_path / "cache"), src)
    t = time.monotonic()
    pf = Prefetcher(image, cache, files=files, threads=4, merging_size=1 << 20).start()
    assert pf.wait(30)
    took = time.monotonic() - t
    assert len(src.calls) == 4 and pf.batches == 4
    assert took < delay * 2.5, took  # not 4 x delay
    starts = sorted(c[0] for c in src.calls)
    assert starts[-1] - starts[0] < delay


def test_files_packed_in_prefetch_order_make_few_large_reads(built, tmp_path):
    src = SlowDir(str(built.blob_dir), 0.0)
    image = open_bootstrap(str(built.boot))
    cache = BlobCacheManager(str(tmp_path / "cache"), src)
    pf = Prefetcher(image, cache, threads=4, merging_size=4 << 20).start()  # the table: /etc, /big/a.bin
    assert pf.wait(30)
    # built with those as prefetch files: first and contiguous in the blob, so a single read
    assert len(src.calls) == 1 and src.calls[0][1] == 0
    assert cache.ready_chunks(image.blobs[0]) == len(chunk_set(image, [b"/etc/passwd", b"/etc/motd", b"/big/a.bin"]))
