"""RAFS READs over virtio-fs whose chunks are all ready in the blob cache: preadv from the
cache's data files straight into guest memory (`BlobDevice.read_ready_into`), one preadv per run
of chunks contiguous in one data file, driven by the Python front-end (no QEMU). The file spans
two blobs (its middle chunks are deduplicated against an earlier image's blob); a chunk not yet
ready, digest validation on, or a cut data file take the decoded-chunk copy instead."""

import ctypes
import mmap
import os
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.merge import merge_layers, tree_from_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.model import ChunkInfo
from nydus_py.storage.cache.blobcache import DATA_SUFFIX, BlobCacheManager
from nydus_py.storage.device import BlobDevice

from ..fs.mountrig import CHUNK
from ..fuse.kernel import READ
from . import vhost_frontend as F
from .test_vhost_read_into import GatedDir, Rig, _start
from .test_vhost_user import fuse_req

_rng = random.Random(30)
X = _rng.randbytes(3 * CHUNK)  # the first image's file: its blob holds these chunks
Y = _rng.randbytes(2 * CHUNK + 777)
DATA = Y[:CHUNK] + X[: 2 * CHUNK] + Y[CHUNK:]  # chunk 0 new, 1-2 deduplicated, 3-4 new (last partial)
SIZE = len(DATA)


@dataclass
class CacheRig:
    rig: Rig
    device: BlobDevice
    cache: BlobCacheManager
    chunks: list[ChunkInfo]

    def read(self, offset: int, size: int, out: list[int], unique: int) -> tuple[int, bytes]:
        return self.rig.read(offset, size, out, unique)

    def counts(self) -> tuple[int, int, int]:
        """(READs answered by preadv, READs that fell back, preadv runs in the cache)."""
        return self.device.direct_reads, self.device.direct_fallbacks, self.cache.stats.direct_reads


def _image(tmp_path: Path) -> tuple[str, str]:
    a, b, blobs = tmp_path / "a", tmp_path / "b", tmp_path / "blobs"
    for d in (a, b, blobs):
        d.mkdir()
    (a / "x").write_bytes(X)
    (b / "f").write_bytes(DATA)
    opts = BuildOptions(chunk_size=CHUNK)
    build_image(tree_from_directory(str(a)), str(tmp_path / "boot-a"), str(blobs), opts)
    first = open_bootstrap(str(tmp_path / "boot-a"))
    tree = merge_layers([tree_from_image(first, str(blobs)), tree_from_directory(str(b))])
    build_image(tree, str(tmp_path / "boot"), str(blobs), opts)
    return str(tmp_path / "boot"), str(blobs)


def _make(tmp_path: Path, *, validate: bool = False) -> CacheRig:
    boot, blob_dir = _image(tmp_path)
    image = open_bootstrap(boot)
    ino = image.lookup(image.root_ino, b"f")
    assert ino is not None
    chunks = list(image.chunks(ino))
    assert [c.blob_index for c in chunks] == [1, 0, 0, 1, 1]  # the file spans both blobs
    source = GatedDir(blob_dir)
    cache = BlobCacheManager(str(tmp_path / "cache"), source, validate=validate, amplify_io=0, stream_size=0)
    device = BlobDevice(image, cache, validate=validate)
    fs = RafsFilesystem(image, device, readahead_chunks=0)
    srv, fe, nodeid = _start(tmp_path, fs)
    return CacheRig(Rig(srv, fe, fs, nodeid, source), device, cache, chunks)


@pytest.fixture
def crig(tmp_path: Path) -> Iterator[CacheRig]:
    r = _make(tmp_path)
    yield r
    r.rig.fe.close()
    r.rig.srv.stop()
    r.cache.close()


def _warm(r: CacheRig) -> None:
    err, p = r.read(0, SIZE, [16, SIZE], 2)
    assert err == 0 and p == DATA
    assert all(r.cache.cached_chunks(r.device.image.blobs[c.blob_index], [c]) for c in r.chunks)


def test_ready_chunks_are_read_into_guest_memory(crig: CacheRig) -> None:
    _warm(crig)
    cases = [
        (0, 4096, [16, 4096], 1),
        (CHUNK - 100, 300, [16, 5, 3, 292], 2),  # chunk 0 (blob 1) then chunk 1 (blob 0)
        (CHUNK + 7, 2 * CHUNK - 10, [16] + [4096] * (2 * CHUNK // 4096), 1),  # chunks 1-2: one run in blob 0
        (2 * CHUNK - 50, 2 * CHUNK, [16, 1000, 2 * CHUNK - 1000], 2),  # blob 0 into blob 1
        (0, SIZE, [16] + [4096] * (SIZE // 4096 + 1), 3),  # the whole file: 3 runs
        (SIZE - 1000, 4096, [16, 4096], 1),  # short: the file ends 1000 bytes in
    ]
    u = 100
    for offset, size, out, runs in cases:
        u += 1
        before = crig.counts()
        err, p = crig.read(offset, size, out, u)
        assert err == 0 and p == DATA[offset : offset + size], (offset, size, len(p))
        after = crig.counts()
        assert after[0] - before[0] == 1, (offset, size)  # answered by preadv, not the copy
        assert after[1] == before[1] and after[2] - before[2] == runs, (offset, size, before, after)
    for offset in (SIZE, SIZE + 5000):  # at and past the end: 0 bytes
        u += 1
        err, p = crig.read(offset, 4096, [16, 4096], u)
        assert err == 0 and p == b""
    assert crig.rig.worker.failed == 0
    assert crig.rig.worker.inline_nowait >= len(cases)  # by the dispatcher, without the pool


def test_a_chunk_not_ready_takes_the_copy_path(crig: CacheRig) -> None:
    err, p = crig.read(10, 100, [16, 4096], 3)  # fetches chunk 0 alone (amplify_io 0)
    assert err == 0 and p == DATA[10:110]
    d0, f0, _ = crig.counts()
    assert d0 == 0 and f0 >= 1
    err, p = crig.read(CHUNK - 100, 300, [16, 4096], 4)  # chunk 1 is not ready: the copy path
    assert err == 0 and p == DATA[CHUNK - 100 : CHUNK + 200]
    d1, f1, _ = crig.counts()
    assert d1 == 0 and f1 > f0
    err, p = crig.read(CHUNK - 100, 300, [16, 4096], 5)  # both ready now: preadv
    assert err == 0 and p == DATA[CHUNK - 100 : CHUNK + 200]
    assert crig.counts()[:2] == (1, f1)


def test_a_cut_data_file_takes_the_copy_path(crig: CacheRig) -> None:
    _warm(crig)
    blob = crig.device.image.blobs[1]
    os.truncate(os.path.join(crig.cache.work_dir, blob.blob_id + DATA_SUFFIX), CHUNK // 2)
    before = crig.cache.stats.invalidated_maps
    err, p = crig.read(CHUNK - 100, 300, [16, 4096], 6)  # chunk 0 of blob 1 reads back short
    assert err == 0 and p == DATA[CHUNK - 100 : CHUNK + 200]  # fetched again, never the cut file's zeros
    assert crig.cache.stats.invalidated_maps > before
    assert crig.device.direct_reads == 0


def test_writable_half_split_across_memory_regions(crig: CacheRig) -> None:
    _warm(crig)
    fe = crig.rig.fe
    size2 = 1 << 20
    memfd2 = os.memfd_create("guest-ram-2")
    os.ftruncate(memfd2, size2)
    mem2 = mmap.mmap(memfd2, size2)
    gpa2 = F.GPA_BASE + fe.mem_size + (1 << 20)
    try:
        region = struct.pack("<QQQQQ", 0, gpa2, size2, F.UVA_BASE + (1 << 32), 0)
        assert fe.acked(F.ADD_MEM_REG, region, [memfd2]) == 0
        q = fe.queues[1]
        offset, size = CHUNK - 3000, 12000  # chunk 0 (blob 1) into chunk 1 (blob 0), across regions
        req = fuse_req(READ, crig.rig.nodeid, struct.pack("<QQIIQII", 0, offset, size, 0, 0, 0, 0), 9)
        r_off = fe.alloc(len(req))
        fe.mem[r_off : r_off + len(req)] = req
        w1 = fe.alloc(16 + 2000)
        w3 = fe.alloc(5000)
        raw = [(F.GPA_BASE + r_off, len(req), 0), (F.GPA_BASE + w1, 16 + 2000, F.WRITE),
               (gpa2 + 4096, 5000, F.WRITE), (F.GPA_BASE + w3, 5000, F.WRITE)]
        before = crig.counts()
        head, _ = q.add([], [], raw=raw, indirect=True)
        q.do_kick()
        got, length = q.wait_used()
        q.free.append(head)
        assert got == head and length == 16 + size
        assert struct.unpack_from("<IiQ", fe.mem, w1) == (16 + size, 0, 9)
        data = bytes(fe.mem[w1 + 16 : w1 + 16 + 2000]) + bytes(mem2[4096 : 4096 + 5000]) + bytes(fe.mem[w3 : w3 + 5000])
        assert data == DATA[offset : offset + size]
        after = crig.counts()
        assert after[0] - before[0] == 1 and after[2] - before[2] == 2
    finally:
        mem2.close()
        os.close(memfd2)


def test_digest_validation_keeps_the_checked_copy(tmp_path: Path) -> None:
    """With validation on, every cached read is digest-checked (BlobCacheManager._cached), which
    needs the bytes in our hands: no preadv into guest memory then."""
    r = _make(tmp_path, validate=True)
    try:
        assert not r.device.direct
        _warm(r)
        err, p = r.read(CHUNK - 100, 300, [16, 4096], 7)
        assert err == 0 and p == DATA[CHUNK - 100 : CHUNK + 200]
        assert r.counts() == (0, 0, 0)
    finally:
        r.rig.fe.close()
        r.rig.srv.stop()
        r.cache.close()


def _resident(path: str) -> bool:
    """Whether the file's first page is in the page cache (mincore(2): looks, reads nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 4096, access=mmap.ACCESS_COPY) as mm:
        anchor = ctypes.c_char.from_buffer(mm)
        try:
            vec = (ctypes.c_ubyte * 1)()
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(4096), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return bool(vec[0] & 1)
        finally:
            del anchor


def _drop_pages(path: str) -> bool:
    """Drop the data file's clean pages from the page cache; whether they are gone."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return not _resident(path)


def test_ready_chunks_not_in_the_page_cache_are_read_by_the_dispatcher(crig: CacheRig) -> None:
    """The dispatcher's attempt reads with RWF_NOWAIT; chunks ready in the blob cache but not in
    the page cache wait on the local disk at most (`read_waits` False: their range is ready), so
    the dispatcher reads them itself with a blocking preadv (`inline_blocking`) instead of
    handing them to the pool. (An RWF_NOWAIT read that fails starts the kernel's readahead, so
    residency is checked with mincore, not with a read.)"""
    _warm(crig)
    crig.cache.flush()  # the written pages become clean (fdatasync), so they can be dropped
    blob = crig.device.image.blobs[1]
    if not _drop_pages(os.path.join(crig.cache.work_dir, blob.blob_id + DATA_SUFFIX)):
        pytest.skip("the cache's filesystem keeps the pages")
    w = crig.rig.worker
    handed, inline, blocking = w.handed_over, w.inline_nowait, w.inline_blocking
    d0 = crig.device.direct_reads
    err, p = crig.read(10, 4096, [16, 4096], 8)  # chunk 0: blob 1
    assert err == 0 and p == DATA[10:4106]
    assert (w.handed_over, w.inline_nowait, w.inline_blocking) == (handed, inline, blocking + 1)
    assert crig.device.direct_reads == d0 + 1  # the blocking preadv (the nowait try that would block counts none)
    err, p = crig.read(20, 4096, [16, 4096], 9)  # in the page cache now: the nowait try answers
    assert err == 0 and p == DATA[20:4116]
    assert (w.handed_over, w.inline_nowait, w.inline_blocking) == (handed, inline + 1, blocking + 1)
