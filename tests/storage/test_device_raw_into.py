"""READs of chunks stored uncompressed in a local blob, preadv'ed straight into the caller's buffers
(no blob cache, digest validation off): `BlobDevice.read_ready_into` over `LocalBlobDir.preadv_into`.
Compressed chunks, validation on, a cut blob and holes take the decoded-chunk copy instead."""

import os
import random
import zlib
from pathlib import Path

import pytest

from nydus_py.builder.options import BuildOptions
from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fuse.iovec import BufferDest, trim
from nydus_py.metrics.backend import BackendStats, MeteredBackend
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.constants import Compressor
from nydus_py.rafs.model import RafsImage
from nydus_py.storage import device as device_mod
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir

from ..fs.mountrig import CHUNK, build

RAND = random.Random(7).randbytes(5 * CHUNK + 1234)  # incompressible: stored as is even with zstd
TEXT = b"compressible text " * 20000


def _image(tmp_path: Path, compressor: Compressor = Compressor.ZSTD) -> tuple[RafsImage, str]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "rand").write_bytes(RAND)
    (src / "text").write_bytes(TEXT)
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CHUNK, compressor=compressor), views=False)
    return open_bootstrap(img.boot), img.blob_dir


def _pages(n: int) -> tuple[bytearray, list[memoryview]]:
    """`n` bytes of buffers cut at 4 KiB (as a guest's pages), plus their backing."""
    mem = bytearray(n)
    v = memoryview(mem)
    return mem, [v[o : o + 4096] for o in range(0, n, 4096)]


@pytest.mark.parametrize("offset, size", [(0, 5 * CHUNK + 1234), (CHUNK - 100, 3 * CHUNK), (4 * CHUNK + 7, 1 << 20)])
def test_uncompressed_chunks_are_preadv_ed_from_the_blob(tmp_path: Path, offset: int, size: int) -> None:
    image, blobs = _image(tmp_path)
    device = BlobDevice(image, LocalBlobDir(blobs), validate=False)
    assert device.direct and device.raw_direct
    ino = image.lookup(image.root_ino, b"rand")
    assert ino is not None
    want = min(len(RAND), offset + size) - offset
    mem, bufs = _pages(-(-size // 4096) * 4096)
    n = device.read_ready_into(ino, offset, size, len(RAND), trim(bufs, 0, size))
    assert n == want and bytes(mem[:n]) == RAND[offset : offset + n]
    assert device.direct_reads == 1 and device.direct_fallbacks == 0
    assert device.chunk_loads == 0  # nothing went through the chunk cache


def test_compressed_chunks_fall_back_to_the_decoded_copy(tmp_path: Path) -> None:
    image, blobs = _image(tmp_path)
    device = BlobDevice(image, LocalBlobDir(blobs), validate=False)
    ino = image.lookup(image.root_ino, b"text")
    assert ino is not None
    assert any(c.compressed for c in image.chunks(ino, 0, len(TEXT)))
    _, bufs = _pages(2 * CHUNK)
    assert device.read_ready_into(ino, 0, 2 * CHUNK, len(TEXT), bufs) == -1
    assert device.direct_fallbacks == 1 and device.direct_reads == 0
    # through the filesystem: the same bytes, by the copy
    fs = RafsFilesystem(image, device, readahead_chunks=0)
    mem, bufs = _pages(2 * CHUNK)
    assert fs.read_into(ino, 0, 100, 2 * CHUNK, BufferDest(bufs, 2 * CHUNK)) == 2 * CHUNK
    assert bytes(mem) == TEXT[100 : 100 + 2 * CHUNK]
    assert device.chunk_loads > 0


def test_validation_on_keeps_the_checked_copy(tmp_path: Path) -> None:
    image, blobs = _image(tmp_path)
    device = BlobDevice(image, LocalBlobDir(blobs), validate=True)
    assert not device.direct and not device.raw_direct


def test_a_cut_blob_is_eio_never_zeros(tmp_path: Path) -> None:
    image, blobs = _image(tmp_path)
    (blob,) = os.listdir(blobs)
    ino = image.lookup(image.root_ino, b"rand")
    assert ino is not None
    last = list(image.chunks(ino, 0, len(RAND)))[-1]
    os.truncate(os.path.join(blobs, blob), last.compressed_offset + 10)
    device = BlobDevice(image, LocalBlobDir(blobs), validate=False)
    fs = RafsFilesystem(image, device, readahead_chunks=0)
    _, bufs = _pages(2 * CHUNK)
    with pytest.raises(OSError):
        fs.read_into(ino, 0, last.file_offset - CHUNK, 2 * CHUNK, BufferDest(bufs, 2 * CHUNK))
    assert device.direct_fallbacks == 1


def test_metered_backend_passes_the_raw_read_through_and_counts_it(tmp_path: Path) -> None:
    image, blobs = _image(tmp_path)
    stats = BackendStats("localfs")
    device = BlobDevice(image, MeteredBackend(LocalBlobDir(blobs), stats), validate=False)
    assert device.raw_direct
    ino = image.lookup(image.root_ino, b"rand")
    assert ino is not None
    mem, bufs = _pages(CHUNK)
    assert device.read_ready_into(ino, 0, CHUNK, len(RAND), bufs) == CHUNK
    assert bytes(mem) == RAND[:CHUNK]
    assert stats.read_count == 1 and stats.read_amount_total == CHUNK
    # a backend without the raw read stays without it when metered
    assert not hasattr(MeteredBackend(object(), BackendStats("x")), "preadv_into")


def test_raw_reads_start_no_readahead_into_the_chunk_cache(tmp_path: Path) -> None:
    image, blobs = _image(tmp_path)
    device = BlobDevice(image, LocalBlobDir(blobs), validate=False)
    fs = RafsFilesystem(image, device, readahead_chunks=4)
    ino = image.lookup(image.root_ino, b"rand")
    assert ino is not None
    got = b""
    for off in range(0, 3 * CHUNK, CHUNK // 2):  # sequential: would start readahead
        mem, bufs = _pages(CHUNK // 2)
        assert fs.read_into(ino, 0, off, CHUNK // 2, BufferDest(bufs, CHUNK // 2)) == CHUNK // 2
        got += bytes(mem)
    assert zlib.crc32(got) == zlib.crc32(RAND[: 3 * CHUNK])
    fs.close()
    assert device.chunk_loads == 0 and device.direct_reads == 6


class _Counting(LocalBlobDir):
    """A LocalBlobDir that counts its preadv calls."""

    def __init__(self, blob_dir: str) -> None:
        super().__init__(blob_dir)
        self.preadvs = 0

    def preadv_into(self, *args: object, **kw: object) -> bool:  # type: ignore[override]
        self.preadvs += 1
        return super().preadv_into(*args, **kw)  # type: ignore[arg-type]


def _count_chunk_records(image: RafsImage) -> list[int]:
    """Wrap image.chunks to count the chunk records it decodes; the count, as a one-item list."""
    seen = [0]
    real = image.chunks

    def chunks(ino: int, offset: int = 0, size: int | None = None) -> list:  # type: ignore[type-arg]
        got = real(ino, offset, size)
        seen[0] += len(got)
        return got

    image.chunks = chunks  # type: ignore[method-assign]
    return seen


def test_a_sequential_reader_decodes_each_chunk_record_once(tmp_path: Path) -> None:
    """A big file read again and again (dd, the guest's caches dropped between passes) maps each
    READ to its preadv from the kept runs: the chunk records are decoded once, not per READ."""
    image, blobs = _image(tmp_path)
    device = BlobDevice(image, LocalBlobDir(blobs), validate=False)
    ino = image.lookup(image.root_ino, b"rand")
    assert ino is not None
    seen = _count_chunk_records(image)
    for _ in range(3):
        for off in range(0, len(RAND), CHUNK):
            mem, bufs = _pages(CHUNK)
            n = device.read_ready_into(ino, off, CHUNK, len(RAND), bufs)
            assert n == min(CHUNK, len(RAND) - off) and bytes(mem[:n]) == RAND[off : off + n]
    assert seen[0] == 6  # the file's 6 chunks, once
    assert device.direct_reads == 18 and device.direct_fallbacks == 0


def test_a_read_across_windows_of_one_blob_run_is_one_preadv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs are kept per window of chunks; a READ over a window's end, contiguous in the blob,
    is still one preadv."""
    monkeypatch.setattr(device_mod, "RAW_WINDOW", 2)
    image, blobs = _image(tmp_path)
    source = _Counting(blobs)
    device = BlobDevice(image, source, validate=False)
    ino = image.lookup(image.root_ino, b"rand")
    assert ino is not None
    for offset, size in ((CHUNK - 100, 3 * CHUNK), (0, len(RAND)), (2 * CHUNK - 1, 2)):
        mem, bufs = _pages(-(-size // 4096) * 4096)
        before = source.preadvs
        assert device.read_ready_into(ino, offset, size, len(RAND), trim(bufs, 0, size)) == size
        assert bytes(mem[:size]) == RAND[offset : offset + size]
        assert source.preadvs == before + 1
    assert len(device._raw_windows) == 3  # windows of 2 chunks over 6 chunks


def test_a_file_of_stored_and_compressed_chunks(tmp_path: Path) -> None:
    """Only the chunks stored as they are are preadv'ed; a READ touching a compressed one takes
    the decoded copy (the same bytes through the filesystem), and the stored ones after it,
    not contiguous with the ones before it in the blob, are a preadv of their own."""
    data = RAND[:CHUNK] + TEXT[:CHUNK] + RAND[CHUNK : 3 * CHUNK]
    src = tmp_path / "src"
    src.mkdir()
    (src / "mixed").write_bytes(data)
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CHUNK, compressor=Compressor.ZSTD),
                views=False)
    image = open_bootstrap(img.boot)
    device = BlobDevice(image, LocalBlobDir(img.blob_dir), validate=False)
    ino = image.lookup(image.root_ino, b"mixed")
    assert ino is not None
    assert [c.compressed for c in image.chunks(ino, 0, len(data))] == [False, True, False, False]
    mem, bufs = _pages(CHUNK)
    assert device.read_ready_into(ino, 0, CHUNK, len(data), bufs) == CHUNK and bytes(mem) == data[:CHUNK]
    mem, bufs = _pages(2 * CHUNK)
    assert device.read_ready_into(ino, 2 * CHUNK, 2 * CHUNK, len(data), bufs) == 2 * CHUNK
    assert bytes(mem) == data[2 * CHUNK :]
    for offset in (CHUNK, CHUNK - 10, 2 * CHUNK - 10):
        _, bufs = _pages(CHUNK)
        assert device.read_ready_into(ino, offset, 100, len(data), trim(bufs, 0, 100)) == -1
    assert device.direct_reads == 2 and device.direct_fallbacks == 3
    fs = RafsFilesystem(image, device, readahead_chunks=0)
    mem, bufs = _pages(4 * CHUNK)
    assert fs.read_into(ino, 0, 0, 4 * CHUNK, BufferDest(bufs, 4 * CHUNK)) == len(data)
    assert bytes(mem) == data


def test_kept_runs_are_bounded_and_one_chunk_files_keep_none(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_mod, "RAW_WINDOW", 1)
    monkeypatch.setattr(device_mod, "RAW_WINDOWS", 2)
    src = tmp_path / "src"
    src.mkdir()
    (src / "rand").write_bytes(RAND)
    (src / "small").write_bytes(RAND[:1000])
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CHUNK), views=False)
    image = open_bootstrap(img.boot)
    device = BlobDevice(image, LocalBlobDir(img.blob_dir), validate=False)
    small = image.lookup(image.root_ino, b"small")
    assert small is not None
    mem, bufs = _pages(4096)
    assert device.read_ready_into(small, 0, 4096, 1000, bufs) == 1000 and bytes(mem[:1000]) == RAND[:1000]
    assert device._raw_windows == {}
    ino = image.lookup(image.root_ino, b"rand")
    assert ino is not None
    for k in range(5):
        mem, bufs = _pages(CHUNK)
        assert device.read_ready_into(ino, k * CHUNK, CHUNK, len(RAND), bufs) == CHUNK
        assert bytes(mem) == RAND[k * CHUNK : (k + 1) * CHUNK]
        assert len(device._raw_windows) <= 2
    assert set(device._raw_windows) == {(ino, 3), (ino, 4)}  # the oldest went first
