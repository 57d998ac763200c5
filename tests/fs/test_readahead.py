"""Chunk readahead: sequential readers get the next chunks loaded in the background, random
readers trigger nothing, and a broken chunk ahead never fails the current read."""

import random
from pathlib import Path

from nydus_py.builder.options import BuildOptions
from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.model import BlobInfo
from nydus_py.storage.cache.chunk_cache import ChunkCache
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir

from ..waiting import wait_until
from .mountrig import CHUNK, build

N_CHUNKS = 64


class CountingDir(LocalBlobDir):
    def __init__(self, path: str, fail_at: int | None = None) -> None:
        super().__init__(path)
        self.reads: list[int] = []
        self.fail_at = fail_at

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        self.reads.append(offset)
        data = super().read(blob, offset, size)
        if offset == self.fail_at:
            return bytes(len(data))  # wrong bytes: the digest check refuses them
        return data


def _setup(tmp_path: Path, fail_chunk: int | None = None):
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(3).randbytes(N_CHUNKS * CHUNK)
    (src / "f").write_bytes(data)
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CHUNK), views=False)
    image = open_bootstrap(img.boot)
    ino = image.lookup(image.root_ino, b"f")
    assert ino is not None
    offsets = [c.compressed_offset for c in image.chunks(ino)]
    source = CountingDir(img.blob_dir, None if fail_chunk is None else offsets[fail_chunk])
    fs = RafsFilesystem(image, BlobDevice(image, source, validate=True), readahead_chunks=2)
    return fs, ino, data, source, offsets


def _settle(fs: RafsFilesystem) -> None:
    ra = fs.readahead
    assert ra is not None
    wait_until(lambda: not ra._inflight, what="the readahead fetches to finish")


def test_sequential_reader_gets_chunks_ahead(tmp_path: Path) -> None:
    fs, ino, data, source, offsets = _setup(tmp_path)
    try:
        step = 16 << 10
        for off in range(0, 3 * CHUNK, step):
            assert bytes(fs.read(ino, 0, off, step)) == data[off : off + step]
        _settle(fs)
        # reading chunks 0..2 sequentially made chunks 3 and 4 load without being asked for
        assert set(source.reads) == set(offsets[:5])
        assert len(source.reads) == 5  # each chunk fetched once
        source.reads.clear()
        for off in range(3 * CHUNK, 5 * CHUNK, step):
            assert bytes(fs.read(ino, 0, off, step)) == data[off : off + step]
        _settle(fs)
        assert set(source.reads) == set(offsets[5:7])  # the hits kept the window moving
    finally:
        fs.close()


def test_random_reader_triggers_nothing(tmp_path: Path) -> None:
    fs, ino, data, source, offsets = _setup(tmp_path)
    try:
        rng = random.Random(1)
        picks = [40, 5, 30, 15, 55, 20]  # far apart: no read lands near where the last one ended
        for k in picks:
            off = k * CHUNK + rng.randrange(CHUNK - 4096)
            assert bytes(fs.read(ino, 0, off, 4096)) == data[off : off + 4096]
        _settle(fs)
        assert sorted(source.reads) == sorted(offsets[k] for k in picks)
        assert fs.readahead is not None and fs.readahead.submitted == 0
    finally:
        fs.close()


def test_broken_chunk_ahead_does_not_fail_current_read(tmp_path: Path) -> None:
    fs, ino, data, source, offsets = _setup(tmp_path, fail_chunk=2)
    try:
        for off in range(0, 2 * CHUNK, CHUNK // 2):
            assert bytes(fs.read(ino, 0, off, CHUNK // 2)) == data[off : off + CHUNK // 2]
        _settle(fs)
        assert offsets[2] in source.reads  # tried ahead, failed quietly
        assert fs.device.read_errors == 1
    finally:
        fs.close()


def test_chunks_already_held_are_not_handed_to_the_pool(tmp_path: Path) -> None:
    """A second sequential pass over cached chunks submits no readahead work (each submission
    is a thread hand-off that a 1 MiB virtio-fs READ would pay for nothing)."""
    fs, ino, data, source, offsets = _setup(tmp_path)
    try:
        ra = fs.readahead
        assert ra is not None
        step = 16 << 10
        for off in range(0, 6 * CHUNK, step):
            assert bytes(fs.read(ino, 0, off, step)) == data[off : off + step]
        _settle(fs)
        submitted = ra.submitted
        assert submitted > 0
        for off in range(0, 4 * CHUNK, step):  # all of these chunks and the next two are cached
            assert bytes(fs.read(ino, 0, off, step)) == data[off : off + step]
        assert ra.submitted == submitted
    finally:
        fs.close()


def test_a_big_file_read_sequentially_releases_what_it_passed(tmp_path: Path) -> None:
    """A file of a quarter of the chunk cache or more would flush it of everything else: its
    chunks leave the cache once the reader is past them (the page cache holds them)."""
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(3).randbytes(N_CHUNKS * CHUNK)
    (src / "f").write_bytes(data)
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CHUNK), views=False)
    image = open_bootstrap(img.boot)
    ino = image.lookup(image.root_ino, b"f")
    assert ino is not None
    source = CountingDir(img.blob_dir)
    small = ChunkCache(N_CHUNKS * CHUNK)  # the file is all of it: released
    fs = RafsFilesystem(image, BlobDevice(image, source, validate=False, cache=small), readahead_chunks=2)
    try:
        step = 32 << 10
        for off in range(0, N_CHUNKS * CHUNK, step):
            assert bytes(fs.read(ino, 0, off, step)) == data[off : off + step]
        _settle(fs)
        ra = fs.readahead
        assert ra is not None and ra.released >= N_CHUNKS - 8
        assert small.held <= 8 * CHUNK
        assert len(source.reads) == len(set(source.reads)) == N_CHUNKS  # nothing decoded twice
    finally:
        fs.close()
        image.close()


def test_a_small_file_keeps_its_chunks(tmp_path: Path) -> None:
    fs, ino, data, source, offsets = _setup(tmp_path)  # a 4 MiB file, a 64 MiB chunk cache
    try:
        step = 32 << 10
        for off in range(0, N_CHUNKS * CHUNK, step):
            assert bytes(fs.read(ino, 0, off, step)) == data[off : off + step]
        _settle(fs)
        assert fs.readahead is not None and fs.readahead.released == 0
        assert fs.device.cache.held == N_CHUNKS * CHUNK
    finally:
        fs.close()


def test_whole_small_file_reads_leave_a_sequential_readers_tracking(tmp_path: Path, monkeypatch) -> None:
    """A READ of a whole file has nothing after it to read ahead: it is not tracked, so a
    stream of small files read whole (a `cat` of a tree) never flushes the table where a
    concurrent sequential reader is followed (it holds _MAX_TRACKED files, then starts over)."""
    import nydus_py.fs.readahead as readahead

    monkeypatch.setattr(readahead, "_MAX_TRACKED", 4)
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    big = rng.randbytes(8 * CHUNK)
    (src / "big").write_bytes(big)
    smalls = {f"s{k}": rng.randbytes(3000) for k in range(8)}
    for name, data in smalls.items():
        (src / name).write_bytes(data)
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CHUNK), views=False)
    image = open_bootstrap(img.boot)
    source = CountingDir(img.blob_dir)
    fs = RafsFilesystem(image, BlobDevice(image, source, validate=True), readahead_chunks=2)
    try:
        ino = image.lookup(image.root_ino, b"big")
        assert ino is not None
        offsets = [c.compressed_offset for c in image.chunks(ino)]
        step = 16 << 10
        for off in range(0, CHUNK, step):  # the big file's first chunk, sequentially
            assert bytes(fs.read(ino, 0, off, step)) == big[off : off + step]
        for name, data in smalls.items():  # more small files read whole than the table holds
            sino = image.lookup(image.root_ino, name.encode())
            assert sino is not None
            assert bytes(fs.read(sino, 0, 0, 128 << 10)) == data
        source.reads.clear()
        assert bytes(fs.read(ino, 0, CHUNK, step)) == big[CHUNK : CHUNK + step]  # into chunk 1
        _settle(fs)
        assert set(source.reads) == set(offsets[1:4])  # still followed: chunks 2 and 3 came ahead
    finally:
        fs.close()
