"""The persistent blob cache over a fake backend: layout, restart reuse, single flight, merging,
amplification, validation, crash safety, LRU eviction, on-demand before prefetch."""

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.chunkdata import verify_chunk
from nydus_py.rafs.errors import DigestMismatch, FormatError
from nydus_py.storage.cache import BlobCacheManager, ChunkMap
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.storage.prefetch import resolve_path

from ..waiting import wait_event, wait_until
from . import images
from .synth import FakeSource, make_blob

REPO = Path(__file__).resolve().parents[2]


def manager(tmp_path, src, **kw):
    return BlobCacheManager(str(tmp_path / "cache"), src, **kw)


def test_layout_and_restart_reuse(tmp_path):
    b = make_blob(40, seed=1)
    src = FakeSource().add(b)
    m = manager(tmp_path, src)
    got = m.read_chunks(b.info, b.chunks[5:9])
    assert got == b.plain[5:9] and src.reads() == 1  # 4 adjacent chunks, one ranged read
    data_path = tmp_path / "cache" / f"{b.info.blob_id}.blob.data"
    map_path = tmp_path / "cache" / f"{b.info.blob_id}.blob.data.chunk_map"
    assert data_path.stat().st_size == b.info.uncompressed_size  # pre-sized, sparse
    with open(data_path, "rb") as f:
        c = b.chunks[7]
        f.seek(c.uncompressed_offset)
        assert f.read(c.uncompressed_size) == b.plain[7]  # uncompressed, at its offset
    assert m.snapshot()["underlying_files"] == [f"{b.info.blob_id}.blob.data"]
    m.close()
    cmap = ChunkMap(str(map_path), 40)
    assert [i for i in range(40) if cmap.is_ready(i)] == [5, 6, 7, 8]
    cmap.close()
    # a new daemon reuses the cache: no backend read for those chunks
    src2 = FakeSource(fail=1000).add(b)
    m2 = manager(tmp_path, src2)
    assert m2.read_chunks(b.info, b.chunks[5:9]) == b.plain[5:9]
    assert src2.reads() == 0 and m2.stats.whole_hits == 1
    m2.close()


def test_whole_image_through_blob_device(tmp_path):
    img = images.build(tmp_path / "img")
    image = open_bootstrap(str(img.boot))
    m = manager(tmp_path, LocalBlobDir(str(img.blob_dir)), amplify_io=1 << 20)
    dev = BlobDevice(image, m, amplify_io=1 << 20)
    for rel, data in img.files.items():
        ino = resolve_path(image, b"/" + rel.encode())
        assert dev.read(ino, 0, len(data) + 1) == data
        if len(data) > 70_000:
            assert dev.read(ino, 65_530, 20) == data[65_530:65_550]
    assert m.stats.digest_errors == 0
    m.flush()  # another manager on the same work_dir sees the bits once they are persisted
    m2 = manager(tmp_path, FakeSource(fail=1000))
    dev2 = BlobDevice(image, m2)
    for rel, data in img.files.items():
        assert dev2.read(resolve_path(image, b"/" + rel.encode()), 0, len(data)) == data
    assert m2.data_all_ready()
    image.close()


def test_single_flight(tmp_path):
    b = make_blob(8, seed=2)
    gate = threading.Event()
    src = FakeSource(gate=gate).add(b)
    m = manager(tmp_path, src)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(m.read_chunks(b.info, [b.chunks[3]])[0]))
               for _ in range(12)]
    for t in threads:
        t.start()
    src.wait_inside(demand=1, what="the one fetch")
    wait_until(lambda: m.stats.waited == 11, what="the other 11 readers to wait for it")
    gate.set()
    for t in threads:
        t.join(10)
    assert results == [b.plain[3]] * 12
    assert src.reads() == 1 and m.stats.waited == 11


def test_merging_respects_amplify_io_and_gaps(tmp_path):
    b = make_blob(32, seed=3, compress=False)  # 16 KiB stored chunks
    src = FakeSource().add(b)
    m = manager(tmp_path, src, amplify_io=64 << 10)
    assert m.read_chunks(b.info, b.chunks[0:10]) == b.plain[0:10]
    assert [c[2] for c in src.calls] == [65536, 65536, 32768]  # at most amplify_io per request
    src.calls.clear()
    m.read_chunks(b.info, [b.chunks[12], b.chunks[20]])  # not adjacent: two requests
    assert len(src.calls) == 2
    m0 = BlobCacheManager(str(tmp_path / "c0"), src, amplify_io=0)
    src.calls.clear()
    m0.read_chunks(b.info, b.chunks[0:3])
    assert len(src.calls) == 3


def test_amplification_fetches_following_chunks(tmp_path):
    b = make_blob(10, seed=4)
    src = FakeSource().add(b)
    m = manager(tmp_path, src, amplify_io=1 << 20)
    assert m.read_chunks(b.info, b.chunks[:1], extra=b.chunks[1:]) == b.plain[:1]
    assert src.reads() == 1 and m.stats.amplified_chunks == 9
    assert m.read_chunks(b.info, b.chunks[1:]) == b.plain[1:]
    assert src.reads() == 1


def test_corruption_on_the_wire_is_refetched_or_eio(tmp_path):
    b = make_blob(6, seed=5)
    src = FakeSource(corrupt=1).add(b)
    m = manager(tmp_path, src)
    assert m.read_chunks(b.info, [b.chunks[2]]) == [b.plain[2]]  # one bad transfer: fetched again
    assert m.stats.digest_errors == 1
    src.corrupt = 2  # bad twice: EIO, nothing cached
    with pytest.raises(DigestMismatch):
        m.read_chunks(b.info, [b.chunks[4]])
    assert m.ready_chunks(b.info) == 1
    assert m.read_chunks(b.info, [b.chunks[4]]) == [b.plain[4]]
    src.fail = 1
    with pytest.raises(OSError):
        m.read_chunks(b.info, [b.chunks[5]])
    assert m.read_chunks(b.info, [b.chunks[5]]) == [b.plain[5]]  # a failure is not cached


def test_bad_bytes_in_cache_are_dropped_with_validate(tmp_path):
    b = make_blob(4, seed=6)
    src = FakeSource().add(b)
    m = manager(tmp_path, src, validate=True)
    m.read_chunks(b.info, b.chunks)
    m.close()
    path = tmp_path / "cache" / f"{b.info.blob_id}.blob.data"
    with open(path, "r+b") as f:
        f.seek(b.chunks[1].uncompressed_offset + 10)
        f.write(b"\xde\xad")
    m = manager(tmp_path, src, validate=True)
    before = src.reads()
    assert m.read_chunks(b.info, b.chunks) == b.plain
    assert m.stats.cache_corruptions == 1 and src.reads() == before + 1


def test_marked_only_after_write(tmp_path, monkeypatch):
    """If the daemon dies after writing data but before marking it, the chunk is fetched again."""
    b = make_blob(4, seed=7)
    src = FakeSource().add(b)
    m = manager(tmp_path, src)

    def die(self, indices):  # noqa: ANN001
        raise OSError(5, "simulated crash before marking")

    assert m.read_chunks(b.info, b.chunks[:2]) == b.plain[:2]  # served at once
    monkeypatch.setattr(ChunkMap, "set_ready", die)
    m.flush()  # the data is synced, the bits never reach the file
    monkeypatch.undo()
    m.close()
    m2 = manager(tmp_path, src)
    assert m2.ready_chunks(b.info) == 0
    before = src.reads()
    assert m2.read_chunks(b.info, b.chunks[:2]) == b.plain[:2] and src.reads() == before + 1
    m2.close()  # its flusher would otherwise run into the next test's fdatasync spy


def test_bits_reach_the_file_only_after_fdatasync(tmp_path, monkeypatch):
    """Batched durability: a written chunk is served from the cache at once, but its bit is in the
    chunk map file only after an fdatasync that came after its write; a crash before the flush
    (here: a second manager reading the files meanwhile) finds nothing ready."""
    b = make_blob(8, seed=8)
    src = FakeSource().add(b)
    m = manager(tmp_path, src, sync_delay=60.0)  # the flusher will not run by itself in this test
    map_path = str(tmp_path / "cache" / f"{b.info.blob_id}.blob.data.chunk_map")
    assert m.read_chunks(b.info, b.chunks[:3]) == b.plain[:3]
    assert m.read_chunks(b.info, b.chunks[:3]) == b.plain[:3] and src.reads() == 1  # cache hits
    crashed = manager(tmp_path, FakeSource(fail=1000))  # what a restart would see now
    assert crashed.ready_chunks(b.info) == 0
    crashed.close()
    synced: list[list[int]] = []
    real_sync = os.fdatasync

    def spy(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath(map_path[: -len(".chunk_map")]):  # not another test's flusher
            cm = ChunkMap(map_path, 8)  # the file's bits at the moment of the sync
            synced.append([i for i in range(8) if cm.is_ready(i)])
            cm.close()
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    assert m.flush() == 3
    monkeypatch.undo()
    assert synced == [[]]  # one sync for the batch, before any bit was set
    cm = ChunkMap(map_path, 8)
    assert [i for i in range(8) if cm.is_ready(i)] == [0, 1, 2]
    cm.close()
    assert m.flush() == 0
    m.close()


def test_failed_fdatasync_forgets_the_chunks(tmp_path, monkeypatch):
    b = make_blob(4, seed=9)
    src = FakeSource().add(b)
    m = manager(tmp_path, src, sync_delay=60.0)
    m.read_chunks(b.info, b.chunks[:2])

    def broken(fd: int) -> None:
        raise OSError(5, "disk error")

    monkeypatch.setattr(os, "fdatasync", broken)
    m.flush()
    monkeypatch.undo()
    assert m.ready_chunks(b.info) == 0  # never marked, fetched again
    assert m.read_chunks(b.info, b.chunks[:2]) == b.plain[:2] and src.reads() == 2
    m.close()
    m2 = manager(tmp_path, src)
    assert m2.ready_chunks(b.info) == 2  # the refetched ones were synced and marked at close
    m2.close()


def test_flusher_persists_in_the_background(tmp_path):
    b = make_blob(4, seed=11)
    m = manager(tmp_path, FakeSource().add(b), sync_delay=0.01)
    m.read_chunks(b.info, b.chunks)
    map_path = str(tmp_path / "cache" / f"{b.info.blob_id}.blob.data.chunk_map")

    def ready_in_file() -> int:
        cm = ChunkMap(map_path, 4)
        try:
            return cm.ready_count
        finally:
            cm.close()

    # without close or an explicit flush
    wait_until(lambda: ready_in_file() == 4, what=lambda: f"4 bits in the chunk map file, have {ready_in_file()}")
    m.close()


CRASH_CHILD = textwrap.dedent("""
    import sys, random
    sys.path.insert(0, {repo!r})
    from tests.storage.synth import FakeSource, make_blob
    from nydus_py.storage.cache import BlobCacheManager
    blobs = [make_blob(256, seed=s) for s in range(3)]
    src = FakeSource()
    for b in blobs:
        src.add(b)
    m = BlobCacheManager({work!r}, src, amplify_io=64 << 10, sync_delay=0.005)
    rng = random.Random({seed})

    def step():
        b = rng.choice(blobs)
        i = rng.randrange(256)
        m.read_chunks(b.info, b.chunks[i:i + rng.randrange(1, 8)])

    for _ in range(10):
        step()
    m.flush()  # some chunks are surely on disk before the kill
    print("ready", flush=True)
    n = 0
    while True:
        step()
        n += 1
        print(str(n).ljust(31), flush=True)  # the parent kills after some of these lines
""")


@pytest.mark.slow
def test_sigkill_never_leaves_a_ready_chunk_with_wrong_bytes(tmp_path):
    blobs = [make_blob(256, seed=s) for s in range(3)]
    for round_ in range(8):
        work = str(tmp_path / f"cache{round_}")
        proc = subprocess.Popen([sys.executable, "-c", CRASH_CHILD.format(repo=str(REPO), work=work, seed=round_)],
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None
        # a one-page pipe: the child, writing a line per step, stays at most 128 steps ahead
        fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        assert proc.stdout.readline().strip() == b"ready"
        for _ in range(5 + 10 * round_):  # a different point of the work each round
            assert proc.stdout.readline(), "the child died before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        ready_total = 0
        for b in blobs:
            mp = os.path.join(work, f"{b.info.blob_id}.blob.data.chunk_map")
            if not os.path.exists(mp):
                continue
            cmap = ChunkMap(mp, 256)
            with open(os.path.join(work, f"{b.info.blob_id}.blob.data"), "rb") as f:
                for c in b.chunks:
                    if cmap.is_ready(c.index):
                        ready_total += 1
                        f.seek(c.uncompressed_offset)
                        verify_chunk(f.read(c.uncompressed_size), c, b.info)
            cmap.close()
        assert 0 < ready_total < 3 * 256  # killed in the middle of the work


def test_lru_eviction_of_whole_blobs(tmp_path):
    blobs = [make_blob(8, seed=10 + i, compress=False) for i in range(3)]
    src = FakeSource()
    for b in blobs:
        src.add(b)
    one = blobs[0].info.uncompressed_size
    # a leftover blob of another image is in work_dir already
    (tmp_path / "cache").mkdir()
    leftover = tmp_path / "cache" / ("f" * 64 + ".blob.data")
    leftover.write_bytes(os.urandom(one))
    m = manager(tmp_path, src, size_limit=int(one * 2.5))
    m.read_chunks(blobs[0].info, blobs[0].chunks)
    m.read_chunks(blobs[1].info, blobs[1].chunks)
    assert not leftover.exists() and m.stats.evictions == 1  # oldest first: the leftover
    m.read_chunks(blobs[0].info, blobs[0].chunks[:1])  # blob 0 is now more recent than blob 1
    m.read_chunks(blobs[2].info, blobs[2].chunks)
    files = set(os.listdir(tmp_path / "cache"))
    assert f"{blobs[1].info.blob_id}.blob.data" not in files
    assert f"{blobs[1].info.blob_id}.blob.data.chunk_map" not in files
    assert f"{blobs[0].info.blob_id}.blob.data" in files and m.usage() <= int(one * 2.5)
    # an evicted blob is simply fetched again
    before = src.reads()
    assert m.read_chunks(blobs[1].info, blobs[1].chunks) == blobs[1].plain and src.reads() > before


def test_blob_in_use_is_not_evicted(tmp_path):
    a, b = make_blob(8, seed=20, compress=False), make_blob(8, seed=21, compress=False)
    gate = threading.Event()
    src = FakeSource().add(a).add(b)
    m = manager(tmp_path, src, size_limit=a.info.uncompressed_size // 2)
    m.read_chunks(a.info, a.chunks[:4])
    src.gate = gate
    t = threading.Thread(target=lambda: m.read_chunks(a.info, a.chunks[4:]))
    t.start()
    src.wait_inside(demand=1, what="the read of blob a")
    src.gate = None
    m.read_chunks(b.info, b.chunks)  # over the limit; a is pinned by the running read
    assert os.path.exists(os.path.join(m.work_dir, f"{a.info.blob_id}.blob.data"))
    gate.set()
    t.join(10)


def test_prefetch_waits_for_on_demand(tmp_path):
    b = make_blob(16, seed=30)
    gate = threading.Event()
    src = FakeSource(gate=gate).add(b)
    m = manager(tmp_path, src)
    demand = threading.Thread(target=lambda: m.read_chunks(b.info, [b.chunks[0]]))
    demand.start()
    src.wait_inside(demand=1, what="the on-demand fetch")
    pf = threading.Thread(target=lambda: m.prefetch(b.info, b.chunks[8:]))
    pf.start()
    wait_until(lambda: m.stats.prefetch_waits == 1, what="prefetch to stand aside")
    assert [c[3] for c in src.calls] == [False]  # prefetch stood aside
    gate.set()
    demand.join(10)
    pf.join(10)
    assert m.stats.prefetch_waits == 1 and src.reads(prefetch=True) == 1
    assert m.ready_chunks(b.info) == 9


def test_on_demand_refetches_after_failed_prefetch(tmp_path):
    b = make_blob(4, seed=31)
    gate = threading.Event()
    src = FakeSource(gate=gate, fail=1).add(b)
    m = manager(tmp_path, src)
    pf = threading.Thread(target=lambda: m.prefetch(b.info, b.chunks[:1]))
    pf.start()
    src.wait_inside(prefetch=1, what="the prefetch (bound to fail)")
    out: list[bytes] = []
    demand = threading.Thread(target=lambda: out.extend(m.read_chunks(b.info, [b.chunks[0]])))
    demand.start()
    wait_until(lambda: m.stats.waited == 1, what="the reader to wait for the prefetch")
    gate.set()
    pf.join(10)
    demand.join(10)
    assert out == [b.plain[0]] and m.stats.waited == 1


def test_bad_blob_ids_and_uncacheable_chunks(tmp_path):
    b = make_blob(3, seed=40)
    src = FakeSource().add(b)
    m = manager(tmp_path, src)
    from dataclasses import replace

    with pytest.raises(FormatError):
        m.read_chunks(replace(b.info, blob_id="../../etc"), b.chunks)
    # no chunk count (old v5 blob table): served, not persisted
    bare = replace(b.info, chunk_count=0)
    assert m.read_chunks(bare, b.chunks) == b.plain and m.stats.uncacheable == 3
    assert m.read_chunks(bare, b.chunks) == b.plain and src.reads() == 2


@pytest.mark.parametrize("name", ["v5-sha256-none", "v5-blake3-lz4"])
def test_real_nydus_v5_images_unaligned_offsets(tmp_path, nydus_fixtures, name):
    """Nydus-built v5 images: packed (unaligned) uncompressed offsets work in the cache file."""
    import stat

    image = open_bootstrap(str(nydus_fixtures / f"{name}.boot"))
    blobs = str(nydus_fixtures / "blobs")
    direct = BlobDevice(image, LocalBlobDir(blobs), validate=True)
    m = manager(tmp_path, LocalBlobDir(blobs), amplify_io=1 << 20)
    cached = BlobDevice(image, m, amplify_io=1 << 20)
    files = [(p, i, image.getattr(i).size) for p, i in image.walk() if stat.S_ISREG(image.getattr(i).mode)]
    assert any(c.uncompressed_offset % 4096 for _p, i, _s in files for c in image.chunks(i))
    want = {p: direct.read(i, 0, s) for p, i, s in files}
    for p, i, s in files:
        assert cached.read(i, 0, s) == want[p], p
    assert m.stats.digest_errors == 0
    if image.blobs[0].chunk_count == 0:
        # the 2020 image has no chunk count and every chunk index is 0: like nydusd's in-memory
        # digested map, such chunks are served but not persisted
        assert m.stats.uncacheable > 0
        image.close()
        return
    assert m.data_all_ready() and m.stats.uncacheable == 0
    m.close()
    m2 = manager(tmp_path, FakeSource(fail=10_000), validate=True)
    again = BlobDevice(image, m2)
    for p, i, s in files:
        assert again.read(i, 0, s) == want[p], p
    assert m2.stats.cache_corruptions == 0
    image.close()


def test_on_demand_does_not_wait_for_queued_prefetch_reads(tmp_path):
    """A prefetch batch of many separate ranges: a reader wanting the last one fetches it
    itself instead of waiting for the batch to get there."""
    b = make_blob(24, seed=32, compress=False)
    held = threading.Event()
    src = FakeSource(prefetch_gate=held).add(b)
    m = manager(tmp_path, src)
    spread = b.chunks[0:20:2]  # ten non-adjacent chunks: ten ranged reads, one after another
    pf = threading.Thread(target=lambda: m.prefetch(b.info, spread, merging_size=1 << 20))
    pf.start()
    src.wait_inside(prefetch=1, what="the first of the prefetch's reads")
    out: list[bytes] = []
    done = threading.Event()
    reader = threading.Thread(target=lambda: (out.extend(m.read_chunks(b.info, [b.chunks[18]])), done.set()))
    reader.start()
    # served while the prefetch is still held in its first read: not queued behind the other nine
    wait_event(done, what="the on-demand read while the prefetch is held")
    assert out == [b.plain[18]] and m.stats.waited == 0
    assert [c[3] for c in src.calls] == [True, False]
    held.set()
    reader.join(10)
    pf.join(10)
    assert m.ready_chunks(b.info) == 10
    assert [c[1] for c in src.calls].count(b.chunks[18].compressed_offset) == 1  # fetched once


def _follow(b):  # noqa: ANN001, ANN202
    return lambda c: iter(b.chunks[c.index + 1:])


def test_cross_file_amplification_opens_on_sequential_misses(tmp_path):
    """A random miss fetches only what it needs; a miss where the previous fetch ended takes the
    blob's next chunks too, in a window that doubles up to amplify_io."""
    from nydus_py.storage.cache.blobcache import FOLLOW_MIN

    b = make_blob(200, seed=50)
    src = FakeSource().add(b)
    m = manager(tmp_path, src, amplify_io=512 << 10)
    f = _follow(b)
    assert m.read_chunks(b.info, [b.chunks[100]], follow=f) == [b.plain[100]]
    assert src.calls[-1][2] == b.chunks[100].compressed_size and m.stats.followed_chunks == 0
    assert m.read_chunks(b.info, [b.chunks[20]], follow=f) == [b.plain[20]]  # random again
    assert m.stats.followed_chunks == 0
    # the next chunk in the blob: window FOLLOW_MIN
    m.read_chunks(b.info, [b.chunks[21]], follow=f)
    first = m.stats.followed_chunks
    size = src.calls[-1][2]
    assert first > 2 and size <= b.chunks[21].compressed_size + FOLLOW_MIN
    assert src.calls[-1][1] == b.chunks[21].compressed_offset
    nxt = 22 + first
    reads = src.reads()
    assert m.read_chunks(b.info, b.chunks[22:nxt], follow=f) == b.plain[22:nxt]  # all fetched along
    assert src.reads() == reads
    # reading on (over the chunk cached at the start, too) doubles the window, up to amplify_io
    calls = len(src.calls)
    for i in range(nxt, 200):
        assert m.read_chunks(b.info, [b.chunks[i]], follow=f) == [b.plain[i]]
    sizes = [c[2] for c in src.calls[calls:]]
    assert sizes[0] > size and max(sizes) <= 512 << 10 and max(sizes) > (512 << 10) - 2 * b.chunks[0].compressed_size
    assert m.stats.sequential_misses == len(sizes) + 1
    assert m.read_chunks(b.info, b.chunks[20:]) == b.plain[20:] and m.stats.whole_hits >= 1


def test_follow_late_opens_the_window_one_sequential_miss_later(tmp_path):
    """Blob views (`follow_late`): the kernel reads a file in a few READs, the second a
    sequential miss at the file's tail; it must not take the next file's chunks along. A third
    sequential miss opens the window as usual (a long stream still grows it)."""
    from nydus_py.storage.cache.blobcache import FOLLOW_MIN

    b = make_blob(60, seed=52)
    src = FakeSource().add(b)
    m = manager(tmp_path, src, amplify_io=512 << 10)
    f = _follow(b)
    m.read_chunks(b.info, [b.chunks[10]], follow=f, follow_late=True)  # random
    m.read_chunks(b.info, [b.chunks[11]], follow=f, follow_late=True)  # first sequential: marked only
    assert m.stats.followed_chunks == 0 and m.stats.sequential_misses == 1
    assert src.calls[-1][1:3] == (b.chunks[11].compressed_offset, b.chunks[11].compressed_size)
    m.read_chunks(b.info, [b.chunks[12]], follow=f, follow_late=True)  # second: FOLLOW_MIN
    assert m.stats.followed_chunks > 2 and src.calls[-1][2] <= b.chunks[12].compressed_size + FOLLOW_MIN
    # without follow_late the first sequential miss opens it (the FUSE driver's reads)
    m.read_chunks(b.info, [b.chunks[40]], follow=f)
    before = m.stats.followed_chunks
    m.read_chunks(b.info, [b.chunks[41]], follow=f)
    assert m.stats.followed_chunks > before


def test_cross_file_amplification_stops_at_cached_or_inflight_chunks(tmp_path):
    b = make_blob(40, seed=51)
    src = FakeSource().add(b)
    m = manager(tmp_path, src, amplify_io=1 << 20)
    f = _follow(b)
    m.read_chunks(b.info, [b.chunks[5]])  # cached already
    m.read_chunks(b.info, [b.chunks[0]], follow=f)
    m.read_chunks(b.info, [b.chunks[1]], follow=f)  # sequential: would take 2.., stops before 5
    assert m.stats.followed_chunks == 3 and src.calls[-1][2] == sum(c.compressed_size for c in b.chunks[1:5])
    # another fetch already has the following chunk: not fetched twice
    gate = threading.Event()
    src.gate = gate
    pf = threading.Thread(target=lambda: m.prefetch(b.info, b.chunks[11:13]))
    pf.start()
    src.wait_inside(prefetch=1, what="the prefetch of 11..12")
    out: list[bytes] = []
    assert m.read_chunks(b.info, [b.chunks[5]], follow=f) == [b.plain[5]]  # a hit carries the stream on
    t = threading.Thread(target=lambda: out.extend(m.read_chunks(b.info, [b.chunks[6]], follow=f)))
    t.start()
    src.wait_inside(demand=1, prefetch=1, what="the on-demand fetch from 6")
    gate.set()
    pf.join(10)
    t.join(10)
    assert out == [b.plain[6]] and m.stats.followed_chunks == 3 + 4  # 7..10, not the prefetched 11
    demand = [c for c in src.calls if not c[3]]
    assert demand[-1][1] == b.chunks[6].compressed_offset
    assert demand[-1][1] + demand[-1][2] == b.chunks[11].compressed_offset
    offsets = [c[1] for c in src.calls]
    assert all(offsets.count(c.compressed_offset) <= 1 for c in b.chunks)


def test_scattered_reads_stay_within_the_read_around_budget(tmp_path):
    """Scattered reads that never use their neighbours: read-around stops once the unused bytes
    it fetched reach AROUND_WASTE of what the reads used; then they fetch only what they read."""
    from nydus_py.storage.cache.blobcache import AROUND_WASTE

    b = make_blob(400, seed=52)
    src = FakeSource().add(b)
    m = manager(tmp_path, src, amplify_io=1 << 20, read_around=16 << 10)  # (a window the budget allows at first)
    picks = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # a first file, read at once
    assert m.read_chunks(b.info, [b.chunks[i] for i in picks], follow=_follow(b)) == [b.plain[i] for i in picks]
    for i in range(40, 400, 23):
        assert m.read_chunks(b.info, [b.chunks[i]], follow=_follow(b)) == [b.plain[i]]
        picks.append(i)
    asked = sum(b.chunks[i].compressed_size for i in picks)
    assert m.stats.demand_bytes == asked and m.stats.ahead_used_bytes == 0
    assert m.stats.around_chunks > 0 and m.stats.around_refused > 0
    fetched = sum(c[2] for c in src.calls)
    assert fetched - asked == m.stats.ahead_bytes <= AROUND_WASTE * asked, (fetched, asked)
    m2 = manager(tmp_path / "off", FakeSource().add(b), amplify_io=1 << 20, read_around=0)
    m2.read_chunks(b.info, [b.chunks[i] for i in picks[:20]], follow=_follow(b))
    for i in picks[20:]:
        m2.read_chunks(b.info, [b.chunks[i]], follow=_follow(b))
    assert sum(c[2] for c in m2.source.calls) == asked


def test_a_random_miss_reads_around_and_a_read_of_a_neighbour_needs_no_fetch(tmp_path):
    b = make_blob(100, seed=53)
    src = FakeSource().add(b)
    m = manager(tmp_path, src, amplify_io=1 << 20, read_around=32 << 10)
    f = _follow(b)
    m.read_chunks(b.info, b.chunks[0:40], follow=f)  # a file of 40 chunks: what it asks for pays for windows
    assert m.stats.around_chunks >= 2  # it read around itself (40.. fetched along)
    took = m.stats.around_chunks
    assert m.read_chunks(b.info, [b.chunks[60]], follow=f) == [b.plain[60]]  # a random miss
    assert m.stats.around_chunks > took and src.calls[-1][1] == b.chunks[60].compressed_offset
    n = m.stats.around_chunks - took
    assert src.calls[-1][2] == sum(c.compressed_size for c in b.chunks[60:61 + n])
    assert src.calls[-1][2] - b.chunks[60].compressed_size <= 32 << 10
    reads = src.reads()
    assert m.read_chunks(b.info, [b.chunks[62]], follow=f) == [b.plain[62]]  # a file read together
    assert src.reads() == reads
    used = m.stats.ahead_used_bytes
    assert used == b.chunks[62].compressed_size
    assert m.read_chunks(b.info, [b.chunks[62]], follow=f) == [b.plain[62]]  # credited once
    assert m.stats.ahead_used_bytes == used


def test_reader_waiting_for_prefetch_does_not_hold_prefetch_back(tmp_path):
    """Only a running on-demand backend fetch makes prefetch stand aside; a reader that waits for
    a chunk a prefetch is fetching does not, so the other prefetch workers go on."""
    b = make_blob(16, seed=53, compress=False)
    held = threading.Event()
    src = FakeSource(prefetch_gate=held).add(b)
    m = manager(tmp_path, src)
    p1 = threading.Thread(target=lambda: m.prefetch(b.info, b.chunks[0:2]))
    p1.start()
    src.wait_inside(prefetch=1, what="the first prefetch")
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.extend(m.read_chunks(b.info, [b.chunks[1]])))
    reader.start()
    wait_until(lambda: m.stats.waited == 1, what="the reader to wait for the first prefetch")
    p2 = threading.Thread(target=lambda: m.prefetch(b.info, b.chunks[8:10]))
    p2.start()
    src.wait_inside(prefetch=2, what="the second prefetch, beside the waiting reader")
    held.set()
    for t in (p1, reader, p2):
        t.join(10)
    assert out == [b.plain[1]] and m.stats.waited == 1
    assert m.stats.prefetch_waits == 0 and src.reads() == 2


def test_flush_waits_for_the_batch_the_flusher_is_persisting(tmp_path, monkeypatch):
    """flush() promises that what was written is ready on disk when it returns, also when the
    background flusher took the batch a moment earlier (before, flush() found nothing pending
    and returned while the flusher was still in its fdatasync)."""
    b = make_blob(4, seed=12)
    m = manager(tmp_path, FakeSource().add(b), sync_delay=0.001)
    map_path = str(tmp_path / "cache" / f"{b.info.blob_id}.blob.data.chunk_map")
    entered, release = threading.Event(), threading.Event()
    real_sync = os.fdatasync

    def slow_sync(fd: int) -> None:
        mine = os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath(map_path[: -len(".chunk_map")])  # not another test's
        if mine and threading.current_thread().name == "blobcache-sync":
            entered.set()
            release.wait(30)
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", slow_sync)
    m.read_chunks(b.info, b.chunks)
    assert entered.wait(30)  # the flusher holds the whole batch now

    def on_disk() -> int:
        cm = ChunkMap(map_path, 4)
        try:
            return cm.ready_count
        finally:
            cm.close()

    t = threading.Thread(target=m.flush)
    t.start()
    t.join(1.0)
    if not t.is_alive():  # flush() returned: its promise must already hold
        assert on_disk() == 4
    release.set()
    t.join(30)
    assert not t.is_alive() and on_disk() == 4
    m.close()
