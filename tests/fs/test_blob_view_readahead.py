"""Decode-ahead on the blob views: a sequential reader of a local blob's view gets its next chunks
loaded (read and decompressed) on a pool while it is answered; random readers and remote blobs
trigger nothing. Hits are counted in the views' metrics."""

import random
import threading
from pathlib import Path

import pytest

from nydus_py.builder.options import BuildOptions
from nydus_py.fs.blob_view import FIRST_BLOB, BlobViewFilesystem
from nydus_py.fs.erofs_serve import ErofsServe
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.model import BlobInfo, RafsImage
from nydus_py.storage.cache import BlobCacheManager
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir

from ..builder.erofs_rig import erofs_available
from ..waiting import wait_until
from .mountrig import CHUNK, build

N_CHUNKS = 48


class CountingDir(LocalBlobDir):
    """Counts backend reads by stored offset, and the threads that made them."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.reads: list[int] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        with self._lock:
            self.reads.append(offset)
            self.threads.add(threading.current_thread().name)
        return super().read(blob, offset, size)


def _image(tmp_path: Path) -> tuple[RafsImage, str, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(7)
    # compressible but not trivially: every chunk is stored compressed and must be decoded
    data = b"".join(rng.randbytes(512) * 8 for _ in range(N_CHUNKS * CHUNK // 4096))
    (src / "big").write_bytes(data)
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CHUNK), views=False)
    return open_bootstrap(img.boot), img.blob_dir, data


def _view(image: RafsImage, source: CountingDir, *, local: bool, **kw: object) -> BlobViewFilesystem:
    return BlobViewFilesystem(image, BlobDevice(image, source, validate=False), local=local, **kw)  # type: ignore[arg-type]


def _file_span(image: RafsImage, name: bytes = b"big") -> tuple[int, int]:
    """Where the file's bytes lie in the blob's view: [start, end)."""
    ino = image.lookup(image.root_ino, name)
    assert ino is not None
    chunks = image.chunks(ino)
    return chunks[0].uncompressed_offset, chunks[-1].uncompressed_offset + chunks[-1].uncompressed_size


def _settle(fs: BlobViewFilesystem) -> None:
    ra = fs.readahead
    assert ra is not None
    wait_until(lambda: not ra._inflight, what="the decode-ahead loads to finish")


def test_sequential_view_reader_gets_chunks_decoded_ahead(tmp_path: Path) -> None:
    image, blob_dir, data = _image(tmp_path)
    source = CountingDir(blob_dir)
    fs = _view(image, source, local=True)
    try:
        start, end = _file_span(image)
        step = CHUNK + CHUNK // 2  # READs that straddle chunks, as EROFS's do
        # the first READs: each needs a chunk the pool is loading, or has loaded
        for off in range(start, start + 4 * step, step):
            got = fs.read(FIRST_BLOB, 0, off, step)
            assert bytes(got) == data[off - start: off - start + step]
        _settle(fs)
        ahead = set(source.reads)
        read_so_far = {c.compressed_offset for c in image.blob_chunks(0, start, 4 * step)}
        assert ahead - read_so_far, "no chunk past the reader was loaded"
        assert any(t.startswith("rafs-readahead") for t in source.threads)
        for off in range(start + 4 * step, end, step):
            got = fs.read(FIRST_BLOB, 0, off, step)
            assert bytes(got) == data[off - start: off - start + step]
        _settle(fs)
        snap = fs.snapshot()
        assert snap["decode_ahead_submitted"] > 0
        # all chunks of the file but the first few were decoded ahead, then read: hits
        assert snap["decode_ahead_hits"] >= N_CHUNKS - 4, snap
        # each chunk fetched once, and nothing far past the file (at most the window)
        assert len(source.reads) == len(set(source.reads))
        assert len(set(source.reads)) <= N_CHUNKS + 4
    finally:
        fs.close()
        image.close()


def test_a_chunk_decoded_ahead_is_not_fetched_again(tmp_path: Path) -> None:
    """The READ that reaches a chunk the pool loaded is answered from memory."""
    image, blob_dir, data = _image(tmp_path)
    source = CountingDir(blob_dir)
    fs = _view(image, source, local=True)
    try:
        start, _end = _file_span(image)
        for off in range(start, start + 2 * CHUNK, CHUNK // 2):
            assert bytes(fs.read(FIRST_BLOB, 0, off, CHUNK // 2)) == data[off - start: off - start + CHUNK // 2]
        _settle(fs)
        assert fs.readahead is not None and fs.readahead.submitted > 0
        source.reads.clear()
        off = start + 2 * CHUNK
        assert bytes(fs.read(FIRST_BLOB, 0, off, CHUNK)) == data[off - start: off - start + CHUNK]
        assert source.reads == [], "the chunk loaded ahead was fetched again"
    finally:
        fs.close()
        image.close()


def test_random_view_reader_triggers_nothing(tmp_path: Path) -> None:
    image, blob_dir, data = _image(tmp_path)
    source = CountingDir(blob_dir)
    fs = _view(image, source, local=True)
    try:
        start, _end = _file_span(image)
        for k in (30, 4, 22, 11, 40, 17):
            off = start + k * CHUNK + 1024
            assert bytes(fs.read(FIRST_BLOB, 0, off, 4096)) == data[off - start: off - start + 4096]
        assert fs.readahead is not None and fs.readahead.submitted == 0
        assert len(source.reads) == 6
    finally:
        fs.close()
        image.close()


def test_remote_views_read_nothing_ahead(tmp_path: Path) -> None:
    """What follows in a remote blob is mostly other files: a network fetch nobody asked for."""
    image, blob_dir, data = _image(tmp_path)
    source = CountingDir(blob_dir)
    fs = _view(image, source, local=False)
    try:
        assert fs.readahead is None
        start, _end = _file_span(image)
        for off in range(start, start + 4 * CHUNK, CHUNK):
            assert bytes(fs.read(FIRST_BLOB, 0, off, CHUNK)) == data[off - start: off - start + CHUNK]
        assert len(source.reads) == len(set(image.blob_chunks(0, start, 4 * CHUNK)))
        assert fs.snapshot()["decode_ahead_hits"] == 0
    finally:
        fs.close()
        image.close()


@pytest.mark.slow
def test_erofs_driver_reads_a_big_local_file_with_chunks_decoded_ahead(tmp_path: Path) -> None:
    """Through the kernel: EROFS reads the file's view sequentially, the pool decodes ahead."""
    erofs_available()
    image, blob_dir, data = _image(tmp_path)
    boot = str(tmp_path / "img" / "boot")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    serve = ErofsServe(image, BlobDevice(image, LocalBlobDir(blob_dir), validate=False), boot, str(mnt),
                       local_blobs=True)
    try:
        serve.start()
        with open(mnt / "big", "rb") as f:
            assert f.read() == data
        snap = serve.snapshot()
        assert snap["kernel_reads"] > 0
        assert snap["decode_ahead_submitted"] > 0 and snap["decode_ahead_hits"] > 0, snap
    finally:
        serve.close()
        image.close()
    assert serve.fs.readahead is not None and serve.fs.readahead._pool is None  # closed with the mounts


def test_chunks_behind_a_sequential_view_reader_leave_the_chunk_cache(tmp_path: Path) -> None:
    """EROFS's page cache holds what the reader passed: the chunk cache keeps only the window
    around the reader, and its memory goes to the chunks ahead."""
    image, blob_dir, data = _image(tmp_path)
    source = CountingDir(blob_dir)
    device = BlobDevice(image, source, validate=False)
    fs = BlobViewFilesystem(image, device, local=True)
    try:
        start, end = _file_span(image)
        step = CHUNK
        for off in range(start, end, step):
            assert bytes(fs.read(FIRST_BLOB, 0, off, step)) == data[off - start: off - start + step]
        _settle(fs)
        snap = fs.snapshot()
        assert snap["released_behind"] >= N_CHUNKS - 12, snap
        assert device.released_chunks == snap["released_behind"]
        # what is left: the slack window behind the reader (256 KiB + a chunk) and the window ahead
        assert device.cache.held <= 12 * CHUNK, device.cache.held
        # a read of a released range is still served, decoded again
        before = len(source.reads)
        assert bytes(fs.read(FIRST_BLOB, 0, start, 4096)) == data[:4096]
        assert len(source.reads) == before + 1
    finally:
        fs.close()
        image.close()


def test_release_is_only_for_the_in_memory_cache(tmp_path: Path) -> None:
    image, blob_dir, _data = _image(tmp_path)
    cache = BlobCacheManager(str(tmp_path / "cache"), LocalBlobDir(blob_dir))
    device = BlobDevice(image, cache, validate=False)
    try:
        c = image.blob_chunks(0, 0, CHUNK)[0]
        device.load_chunk(c)
        assert device.release(c) is False  # the blob cache is on disk: nothing to give back
        plain = BlobDevice(image, LocalBlobDir(blob_dir), validate=False)
        assert plain.release(c) is False  # not held
        plain.load_chunk(c)
        assert plain.release(c) is True and plain.released_chunks == 1
        assert plain.cache.held == 0
    finally:
        cache.close()
        image.close()


class GatedDir(CountingDir):
    """Holds the decode-ahead pool's reads until `gate` opens (the reader's own go through)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.waiting = 0

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        if threading.current_thread().name.startswith("rafs-readahead"):
            self.waiting += 1
            self.gate.wait(30)
        return super().read(blob, offset, size)


def test_loads_the_reader_got_past_first_are_skipped(tmp_path: Path) -> None:
    """A load still queued when the reader has passed its chunk would decode it for nobody (and,
    with release-behind, decode it again after the reader let it go)."""
    image, blob_dir, data = _image(tmp_path)
    source = GatedDir(blob_dir)
    fs = _view(image, source, local=True)
    ra = fs.readahead
    assert ra is not None
    try:
        start, _end = _file_span(image)
        chunks = image.blob_chunks(0, start, 12 * CHUNK)
        for off in (start, start + CHUNK):  # sequential: chunks 2..5 are handed to the pool
            assert bytes(fs.read(FIRST_BLOB, 0, off, CHUNK)) == data[off - start: off - start + CHUNK]
        assert ra.submitted == 4
        wait_until(lambda: source.waiting == 2, what="both pool threads to hold a load")
        off = start + 8 * CHUNK  # the reader jumps past the queued chunks 4 and 5
        assert bytes(fs.read(FIRST_BLOB, 0, off, CHUNK)) == data[off - start: off - start + CHUNK]
        source.gate.set()
        _settle(fs)
        assert ra.skipped == 2
        assert chunks[4].compressed_offset not in source.reads
        assert chunks[5].compressed_offset not in source.reads
        assert fs.snapshot()["decode_ahead_skipped"] == 2
    finally:
        source.gate.set()
        fs.close()
        image.close()


class ReaderGatedDir(CountingDir):
    """Holds the reads of one chunk (a concurrent READ loading it) until `gate` opens."""

    def __init__(self, path: str, hold: int) -> None:
        super().__init__(path)
        self.hold = hold
        self.gate = threading.Event()
        self.held = threading.Event()

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        if offset == self.hold:
            self.held.set()
            self.gate.wait(30)
        return super().read(blob, offset, size)


def test_a_chunk_another_reader_is_loading_is_not_handed_to_the_pool(tmp_path: Path) -> None:
    """A pool thread would only wait for that reader's load, while the chunks after it wait
    for a pool thread."""
    image, blob_dir, data = _image(tmp_path)
    start, _end = _file_span(image)
    chunks = image.blob_chunks(0, start, 8 * CHUNK)
    source = ReaderGatedDir(blob_dir, hold=chunks[3].compressed_offset)
    fs = _view(image, source, local=True)
    ra = fs.readahead
    assert ra is not None
    try:
        off3 = start + 3 * CHUNK
        other = threading.Thread(target=fs.device.read_blob, args=(0, off3, CHUNK, fs.sizes[0]))
        other.start()  # a concurrent READ of chunk 3, stuck in the backend
        wait_until(source.held.is_set, what="the other READ to be loading chunk 3")
        for off in (start, start + CHUNK):  # sequential: chunks 2..5 are wanted ahead
            assert bytes(fs.read(FIRST_BLOB, 0, off, CHUNK)) == data[off - start: off - start + CHUNK]
        assert ra.submitted == 3  # 2, 4 and 5: not 3
        source.gate.set()
        other.join(30)
        _settle(fs)
        assert source.reads.count(chunks[3].compressed_offset) == 1
    finally:
        source.gate.set()
        fs.close()
        image.close()


def test_past_a_big_file_small_files_chunks_are_not_decoded_ahead(tmp_path: Path) -> None:
    """After a big file a view goes on with small files' chunks: a window of 4 chunks' bytes
    covered dozens of them, each a thread hand-off that costs more than its decode saves."""
    src = tmp_path / "src"
    (src / "z").mkdir(parents=True)
    rng = random.Random(9)
    big = rng.randbytes(8 * CHUNK)
    (src / "a_big").write_bytes(big)
    for k in range(64):  # blob order follows: 64 small files of 4 KiB, one chunk each
        (src / "z" / f"s{k:03d}").write_bytes(rng.randbytes(4096))
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CHUNK), views=False)
    image = open_bootstrap(img.boot)
    source = CountingDir(img.blob_dir)
    fs = _view(image, source, local=True)
    try:
        start, end = _file_span(image, b"a_big")
        assert image.blob_chunks(0, end, 4 * CHUNK)[-1].uncompressed_size == 4096  # small chunks follow
        for off in range(start, end, CHUNK):
            assert bytes(fs.read(FIRST_BLOB, 0, off, CHUNK)) == big[off - start: off - start + CHUNK]
        _settle(fs)
        past = [o for o in source.reads if o not in {c.compressed_offset for c in image.blob_chunks(0, start, end - start)}]
        assert past == []
        assert fs.snapshot()["decode_ahead_hits"] >= 8 - 3  # the big file's own chunks were
        # reading on through the small files costs a chunk record or two per READ, not a window's
        records: list[int] = []
        ra = fs.readahead
        assert ra is not None
        inner = ra.chunks_of
        ra.chunks_of = lambda k, o, n: records.append(len(got := inner(k, o, n))) or got  # type: ignore[func-returns-value]
        small_end = image.blob_chunks(0, end, 64 * 4096)[-1]
        tail = small_end.uncompressed_offset + small_end.uncompressed_size
        reads = 0
        for off in range(end, tail, 4 * 4096):
            fs.read(FIRST_BLOB, 0, off, 4 * 4096)
            reads += 1
        assert sum(records) <= 2 * reads, (sum(records), reads)
    finally:
        fs.close()
        image.close()
