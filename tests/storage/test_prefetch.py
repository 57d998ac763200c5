"""Prefetch into the blob cache: table hints, --prefetch-files, prefetch_all, the bandwidth cap,
and on-demand reads that never wait behind prefetch."""

import threading

import pytest

from nydus_py.rafs import open_bootstrap
from nydus_py.storage.cache import BlobCacheManager
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.storage.prefetch import Prefetcher, TokenBucket, read_prefetch_list, resolve_path

from ..clock import ManualClock
from ..waiting import wait_event
from . import images
from .synth import FakeSource


def held_source(built: images.BuiltImage, prefetch_gate: threading.Event | None = None) -> FakeSource:
    """The image's blobs behind a recording fake backend (a far registry whose prefetch
    requests stay in flight until the test opens `prefetch_gate`)."""
    blobs = {p.name: p.read_bytes() for p in built.blob_dir.iterdir()}
    return FakeSource(blobs=blobs, prefetch_gate=prefetch_gate)


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


class Waits:
    """A prefetch worker's wait for the bandwidth cap, on a manual clock: time passes at once."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.seconds: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, seconds: float) -> bool:
        with self.lock:
            self.seconds.append(seconds)
            self.clock.advance(seconds)
        return False  # not stopped


def test_bandwidth_cap(built, tmp_path):
    rate = 400_000
    files = [b"/big/a.bin", b"/big/b.bin"]
    clock = ManualClock()
    waits = Waits(clock)
    start = clock()
    image, cache, pf = run(built, tmp_path, files=files, bandwidth=rate, merging_size=64 << 10, threads=4,
                           clock=clock, pause=waits)
    total = pf.bytes_planned
    assert cache.stats.prefetch_data_amount == total > 600_000 and pf.batches > 4
    # the bucket made the workers wait: the last batch went out no earlier than the bytes of all
    # the batches before it take at `rate` (each batch is at most merging_size bytes)
    assert waits.seconds and clock() - start >= (total - (64 << 10)) / rate
    uncapped = Waits(ManualClock())
    run(built, tmp_path / "uncapped", files=files, merging_size=64 << 10, threads=4, clock=uncapped.clock,
        pause=uncapped)
    assert uncapped.seconds == []  # no cap: no worker ever waits


def test_on_demand_not_queued_behind_prefetch(built, tmp_path):
    held = threading.Event()
    src = held_source(built, held)
    image = open_bootstrap(str(built.boot))
    cache = BlobCacheManager(str(tmp_path / "cache"), src, amplify_io=0)
    pf = Prefetcher(image, cache, prefetch_all=True, use_table=False, threads=2, merging_size=64 << 10).start()
    src.wait_inside(prefetch=2, what="both prefetch workers busy")
    dev = BlobDevice(image, cache)
    ino = resolve_path(image, b"/text/log.txt")
    got: list[bytes] = []
    done = threading.Event()
    reader = threading.Thread(target=lambda: (got.append(bytes(dev.read(ino, 300_000, 100))), done.set()))
    reader.start()
    # answered while both prefetch reads are still held: one request of its own, queued behind nothing
    wait_event(done, what="the on-demand read while prefetch holds every worker")
    assert got == [built.files["text/log.txt"][300_000:300_100]]
    assert [c[3] for c in src.calls] == [True, True, False] and not pf.done.is_set()
    held.set()
    reader.join(10)
    assert pf.wait(60) and pf.errors == 0
    assert sum(1 for c in src.calls if c[3]) > 2  # prefetch went on afterwards
    assert cache.data_all_ready()


def test_scattered_files_are_fetched_in_parallel(built, tmp_path):
    """Each batch is one ranged read of adjacent chunks: files scattered in the blob become
    separate batches that the workers send side by side (not one worker's queue of reads)."""
    held = threading.Event()
    src = held_source(built, held)
    image = open_bootstrap(str(built.boot))
    files = [b"/small/f03", b"/small/f11", b"/small/f19", b"/small/f27"]
    runs = {tuple(c.compressed_offset for c in image.chunks(resolve_path(image, f))) for f in files}
    assert len(runs) == 4
    cache = BlobCacheManager(str(tmp_path / "cache"), src)
    pf = Prefetcher(image, cache, files=files, threads=4, merging_size=1 << 20).start()
    # all four reads in the backend at once (one worker's queue would hold the others back)
    src.wait_inside(prefetch=4, what="four batches side by side")
    held.set()
    assert pf.wait(30)
    assert len(src.calls) == 4 and pf.batches == 4


def test_files_packed_in_prefetch_order_make_few_large_reads(built, tmp_path):
    src = held_source(built)
    image = open_bootstrap(str(built.boot))
    cache = BlobCacheManager(str(tmp_path / "cache"), src)
    pf = Prefetcher(image, cache, threads=4, merging_size=4 << 20).start()  # the table: /etc, /big/a.bin
    assert pf.wait(30)
    # built with those as prefetch files: first and contiguous in the blob, so a single read
    assert len(src.calls) == 1 and src.calls[0][1] == 0
    assert cache.ready_chunks(image.blobs[0]) == len(chunk_set(image, [b"/etc/passwd", b"/etc/motd", b"/big/a.bin"]))
