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
