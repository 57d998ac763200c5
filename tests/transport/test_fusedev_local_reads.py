"""READs that wait on nothing slower than a local disk are answered by the thread that read
them (no leader hand-off: no thread wake-ups and GIL passes per READ); READs that may wait on a
registry are still handed on. The hint goes Filesystem.read_waits -> Vfs -> FuseSession ->
FuseDevSession. Through a blob cache, a READ whose chunks are all ready in it (warm, or
prefetched) does not wait either; one whose chunk is not fetched yet is handed on."""

import contextlib
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fuse.abi import Opcode
from nydus_py.fuse.protocol import FuseSession
from nydus_py.metrics.backend import BackendStats, MeteredBackend
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.cache.blobcache import BlobCacheManager
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.transport.fusedev import KEEP_READ_MAX, FuseDevSession
from nydus_py.vfs.vfs import Vfs
from tests.conftest import require_device
from tests.fs.mountrig import CHUNK, abort_connection, build
from tests.fuse.kernel import Kernel, decode_entry_out
from tests.fuse.memfs import MemFS

GETATTR, READ = 3, 15


class RemoteDir(LocalBlobDir):
    """A blob source that says nothing about being local (a registry backend, as far as the
    device can tell)."""

    local = False


@pytest.fixture
def image(tmp_path: Path):  # noqa: ANN201
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(CHUNK + 100 * i))
    (src / "big").write_bytes(os.urandom(8 * CHUNK))
    img = build(str(src), str(tmp_path / "img"), views=False)
    boot = open_bootstrap(img.boot)
    yield src, img, boot
    boot.close()


def test_rafs_reads_wait_only_without_a_local_backend(image, tmp_path: Path) -> None:  # noqa: ANN001
    _src, img, boot = image
    local = LocalBlobDir(img.blob_dir)
    metered = MeteredBackend(LocalBlobDir(img.blob_dir), BackendStats("localfs"))
    cache = BlobCacheManager(str(tmp_path / "cache"), LocalBlobDir(img.blob_dir))
    remote = RemoteDir(img.blob_dir)
    fss = {name: RafsFilesystem(boot, BlobDevice(boot, src))
           for name, src in (("local", local), ("metered", metered), ("cache", cache), ("remote", remote))}
    try:
        answers = {name: fs.read_waits(boot.root_ino) for name, fs in fss.items()}
    finally:
        for fs in fss.values():
            fs.close()
        for s in (local, metered.inner, remote):
            s.close()
        cache.close()
    # a blob cache writes and syncs its files: its fills may wait
    assert answers == {"local": False, "metered": False, "cache": True, "remote": True}


def test_the_session_asks_the_filesystem_of_the_inode() -> None:
    class Local(MemFS):
        def read_waits(self, ino: int, offset: int = 0, size: int = 0) -> bool:
            return ino != 5

    vfs = Vfs()
    vfs.mount("/", Local())
    session = FuseSession(vfs)
    k = Kernel(session)
    _, req = k.build(Opcode.READ, 5, b"\0" * 40)
    assert session.read_waits(req)  # before INIT: the cautious answer
    k.init()
    assert not session.read_waits(k.build(Opcode.READ, 5, b"\0" * 40)[1])
    assert session.read_waits(k.build(Opcode.READ, 6, b"\0" * 40)[1])
    assert session.read_waits(b"\0" * 8)  # too short to name an inode
    assert FuseSession(MemFS()).read_waits(req)  # the default: every READ may wait


def _serve_and_read(image, tmp_path: Path, read_waits):  # noqa: ANN001, ANN202
    require_device("/dev/fuse")
    assert 8 * CHUNK >= 2 * KEEP_READ_MAX
    src, img, boot = image
    source = LocalBlobDir(img.blob_dir)
    fs = RafsFilesystem(boot, BlobDevice(boot, source), attr_timeout=0.0, readahead_chunks=0)
    session = FuseSession(fs)
    threads: dict[int, set[int]] = {GETATTR: set(), READ: set()}

    def handler(req: memoryview):  # noqa: ANN202
        if req[4] in threads:
            threads[req[4]].add(threading.get_ident())
        return session.handle_vectored(req)

    mnt = Path(os.path.realpath(tmp_path / "mnt"))
    mnt.mkdir()
    dev = FuseDevSession(handler, str(mnt), threads=4, max_write=session.max_write, poll_us=0,
                         read_waits=read_waits(session))
    dev.mount()
    watchdog = threading.Timer(120, abort_connection, args=(str(mnt),))
    watchdog.start()
    try:
        for i in range(4):
            for _ in range(20):  # GETATTR, READ, GETATTR, READ ...
                os.stat(mnt / f"f{i}")
                fd = os.open(mnt / f"f{i}", os.O_RDONLY | os.O_DIRECT)
                try:
                    assert os.pread(fd, 4096, 0) == (src / f"f{i}").read_bytes()[:4096]
                finally:
                    os.close(fd)
        m = dev.poll_metrics()
        # a READ larger than KEEP_READ_MAX (a readahead window) is handed on all the same
        fd = os.open(mnt / "big", os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.pread(fd, KEEP_READ_MAX * 2, 0) == (src / "big").read_bytes()[:KEEP_READ_MAX * 2]
        finally:
            os.close(fd)
        big = dev.poll_metrics()
        assert big["reads_kept"] == m["reads_kept"], (m, big)
        return m, threads
    finally:
        dev.close()
        watchdog.cancel()
        fs.close()
        source.close()


@pytest.mark.slow
@pytest.mark.root
def test_local_reads_stay_on_the_reading_thread(image, tmp_path: Path) -> None:  # noqa: ANN001
    m, threads = _serve_and_read(image, tmp_path, lambda s: s.read_waits)
    assert m["reads_kept"] >= 80, m
    # one reader keeps the role across GETATTRs and READs alike
    assert len(threads[GETATTR] | threads[READ]) <= 2, threads


@pytest.mark.slow
@pytest.mark.root
def test_reads_that_may_wait_are_handed_on(image, tmp_path: Path) -> None:  # noqa: ANN001
    m, threads = _serve_and_read(image, tmp_path, lambda s: None)
    assert m["reads_kept"] == 0, m
    assert len(threads[GETATTR] | threads[READ]) >= 2, threads  # each READ passes the role on


def _read_req(k: Kernel, ino: int, offset: int, size: int) -> bytes:
    return k.build(READ, ino, struct.pack("<QQIIQII", 0, offset, size, 0, 0, 0x8000, 0))[1]


def test_the_session_asks_about_the_reads_range_in_the_blob_cache(image, tmp_path: Path) -> None:  # noqa: ANN001
    _src, img, boot = image
    cache = BlobCacheManager(str(tmp_path / "cache"), LocalBlobDir(img.blob_dir), amplify_io=0, read_around=0)
    fs = RafsFilesystem(boot, BlobDevice(boot, cache, validate=False), readahead_chunks=0)
    try:
        session = FuseSession(fs)
        k = Kernel(session)
        k.init()
        f1, f2 = (decode_entry_out(k.lookup(1, name)[1])["nodeid"] for name in (b"f1", b"f2"))
        assert session.read_waits(_read_req(k, f1, 0, 4096))  # not fetched yet: may wait
        assert k.read(f1, 0, 0, 4096)[0] == 0  # fetched into the cache (its first chunk)
        assert not session.read_waits(_read_req(k, f1, 0, 4096))  # ready: does not wait
        assert not session.read_waits(_read_req(k, f1, 100, CHUNK - 100))
        assert session.read_waits(_read_req(k, f1, CHUNK - 100, 4096))  # reaches its second chunk
        assert session.read_waits(_read_req(k, f2, 0, 4096))  # another file's chunk
        assert session.read_waits(k.build(READ, f1)[1])  # no range: the inode alone may wait
    finally:
        fs.close()
        cache.close()


@contextlib.contextmanager
def _cached_mount(image, tmp_path: Path) -> Iterator[tuple[Path, FuseDevSession]]:  # noqa: ANN001
    """The image through a blob cache (validation off), served with read_waits."""
    require_device("/dev/fuse")
    _src, img, boot = image
    cache = BlobCacheManager(str(tmp_path / "cache"), LocalBlobDir(img.blob_dir), amplify_io=0, read_around=0)
    fs = RafsFilesystem(boot, BlobDevice(boot, cache, validate=False), attr_timeout=0.0, readahead_chunks=0)
    session = FuseSession(fs)
    mnt = Path(os.path.realpath(tmp_path / "mnt"))
    mnt.mkdir()
    dev = FuseDevSession(session.handle_vectored, str(mnt), threads=4, max_write=session.max_write, poll_us=0,
                         read_waits=session.read_waits)
    dev.mount()
    watchdog = threading.Timer(120, abort_connection, args=(str(mnt),))
    watchdog.start()
    try:
        yield mnt, dev
    finally:
        dev.close()
        watchdog.cancel()
        fs.close()
        cache.close()


def direct_reads(src: Path, mnt: Path, names: list[str], size: int = 4096) -> None:
    """One O_DIRECT READ of the head of each file (no page cache: each one reaches the daemon)."""
    for name in names:
        fd = os.open(mnt / name, os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.pread(fd, size, 0) == (src / name).read_bytes()[:size]
        finally:
            os.close(fd)


@pytest.mark.slow
@pytest.mark.root
def test_reads_ready_in_the_blob_cache_stay_on_the_reading_thread(image, tmp_path: Path) -> None:  # noqa: ANN001
    src = image[0]
    names = [f"f{i}" for i in range(4)]
    with _cached_mount(image, tmp_path) as (mnt, dev):
        direct_reads(src, mnt, names)  # cold: each chunk fetched into the cache, on a handed-off READ
        cold = dev.poll_metrics()["reads_kept"]
        direct_reads(src, mnt, names)  # warm: every chunk ready
        warm = dev.poll_metrics()["reads_kept"]
    assert cold == 0, cold
    assert warm - cold >= len(names), (cold, warm)
