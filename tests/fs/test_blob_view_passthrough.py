"""The blob view's passthrough decisions without a kernel: a complete blob's view opens with
FOPEN_PASSTHROUGH on the cache data file (registered through the transport's backing registry,
here a fake), anything else on the READ path, logged and counted; backing ids and cache pins are
given back at the last release."""

import errno
import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from nydus_py.fs.blob_view import FIRST_BLOB, BlobViewFilesystem
from nydus_py.fuse.abi import FOpenFlags, InitFlags
from nydus_py.fuse.api import Opened
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.cache import BlobCacheManager
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from tests.fs.mountrig import CHUNK, Image, build


@dataclass
class FakeBacking:
    """The transport's backing registry: records the inode of each registered file."""

    fail: int = 0  # errno to refuse with
    opened: dict[int, int] = field(default_factory=dict)  # id -> inode
    closed: list[int] = field(default_factory=list)

    def backing_open(self, fd: int) -> int:
        if self.fail:
            raise OSError(self.fail, os.strerror(self.fail))
        backing_id = len(self.opened) + 1
        self.opened[backing_id] = os.fstat(fd).st_ino
        return backing_id

    def backing_close(self, backing_id: int) -> None:
        self.closed.append(backing_id)


@pytest.fixture(scope="module")
def img(tmp_path_factory) -> Image:
    src = tmp_path_factory.mktemp("src")
    rng = random.Random(9)
    for i in range(3):
        (src / f"f{i}").write_bytes(rng.randbytes(2 * CHUNK + 100 * i))
    return build(str(src), str(tmp_path_factory.mktemp("img")), views=False)


@contextmanager
def view_fs(img: Image, cache_dir: str, *, negotiated: bool = True, fill: int = -1, validate: bool = False,
            backing: FakeBacking | None = None) -> Iterator[tuple[BlobViewFilesystem, BlobCacheManager]]:
    """A blob view fs over a cache with the first `fill` bytes of blob 0 fetched (-1: all)."""
    image = open_bootstrap(img.boot)
    cache = BlobCacheManager(cache_dir, LocalBlobDir(img.blob_dir), validate=validate)
    fs = BlobViewFilesystem(image, BlobDevice(image, cache))
    fs.backing = backing if backing is not None else FakeBacking()
    assert fs.init(InitFlags(0)) & InitFlags.PASSTHROUGH
    fs.negotiated(InitFlags.PASSTHROUGH if negotiated else InitFlags(0))
    size = fs.sizes[0] if fill < 0 else fill
    if size:
        fs.read(FIRST_BLOB, 0, 0, size)
    try:
        yield fs, cache
    finally:
        fs.release_all()
        cache.close()
        image.close()


def pins(cache: BlobCacheManager) -> int:
    return sum(cb.pins for cb in cache._blobs.values())


def test_complete_blob_opens_with_passthrough_until_last_release(img, tmp_path) -> None:
    backing = FakeBacking()
    with view_fs(img, str(tmp_path / "c"), backing=backing) as (fs, cache):
        reads = fs.stats.reads
        first = fs.open(FIRST_BLOB, os.O_RDONLY)
        assert first == Opened(0, FOpenFlags.PASSTHROUGH, 1)
        data = os.path.join(cache.work_dir, fs.blobs[0].blob_id + ".blob.data")
        assert backing.opened == {1: os.stat(data).st_ino}
        assert fs.open(FIRST_BLOB, os.O_RDONLY) == first  # the same backing for every open
        assert pins(cache) == 1
        fs.release(FIRST_BLOB, 0)
        assert backing.closed == [] and pins(cache) == 1
        fs.release(FIRST_BLOB, 0)
        assert backing.closed == [1] and pins(cache) == 0
        snap = fs.stats.snapshot()
        assert (snap["passthrough_opens"], snap["passthrough_fallbacks"], snap["passthrough_files"]) == (2, 0, 0)
        assert fs.stats.reads == reads


@pytest.mark.parametrize(("kw", "reason"), [
    ({"fill": CHUNK}, "chunks cached"),
    ({"negotiated": False}, "not negotiated"),
    ({"validate": True}, "validation is on"),
])
def test_otherwise_the_read_path_logged_and_counted(img, tmp_path, caplog, kw, reason) -> None:
    caplog.set_level(logging.INFO, logger="nydus_py.fs.blob_view")
    backing = FakeBacking()
    with view_fs(img, str(tmp_path / "c"), backing=backing, **kw) as (fs, cache):
        assert fs.open(FIRST_BLOB, os.O_RDONLY) == (0, FOpenFlags.DIRECT_IO)
        assert backing.opened == {} and pins(cache) == 0
        snap = fs.stats.snapshot()
        assert (snap["passthrough_opens"], snap["passthrough_fallbacks"], snap["passthrough_errors"]) == (0, 1, 0)
        assert reason in caplog.text
        fs.release(FIRST_BLOB, 0)


def test_refused_backing_falls_back_and_unpins(img, tmp_path, caplog) -> None:
    with view_fs(img, str(tmp_path / "c"), backing=FakeBacking(fail=errno.EPERM)) as (fs, cache):
        assert fs.open(FIRST_BLOB, os.O_RDONLY) == (0, FOpenFlags.DIRECT_IO)
        assert pins(cache) == 0
        snap = fs.stats.snapshot()
        assert (snap["passthrough_fallbacks"], snap["passthrough_errors"]) == (1, 1)
        assert "FUSE_DEV_IOC_BACKING_OPEN" in caplog.text


def test_a_view_open_on_the_read_path_stays_there(img, tmp_path) -> None:
    """The kernel refuses to mix passthrough and cached opens of one inode: a blob completed while
    its view is open keeps the READ path until every open of it is released."""
    backing = FakeBacking()
    with view_fs(img, str(tmp_path / "c"), backing=backing, fill=CHUNK) as (fs, _cache):
        assert fs.open(FIRST_BLOB, os.O_RDONLY) == (0, FOpenFlags.DIRECT_IO)
        fs.read(FIRST_BLOB, 0, 0, fs.sizes[0])  # now complete
        assert fs.open(FIRST_BLOB, os.O_RDONLY) == (0, FOpenFlags.DIRECT_IO)
        fs.release(FIRST_BLOB, 0)
        fs.release(FIRST_BLOB, 0)
        assert fs.open(FIRST_BLOB, os.O_RDONLY) == Opened(0, FOpenFlags.PASSTHROUGH, 1)


def test_release_all_gives_everything_back(img, tmp_path) -> None:
    backing = FakeBacking()
    with view_fs(img, str(tmp_path / "c"), backing=backing) as (fs, cache):
        fs.open(FIRST_BLOB, os.O_RDONLY)
        fs.release_all()
        fs.release_all()
        assert backing.closed == [1] and pins(cache) == 0
        assert fs.stats.snapshot()["passthrough_files"] == 0


@pytest.mark.parametrize(("local", "flags"), [(False, FOpenFlags.DIRECT_IO), (True, FOpenFlags.KEEP_CACHE)])
def test_views_of_local_blobs_keep_a_page_cache(img, local, flags) -> None:
    """Remote blobs: DIRECT_IO (view readahead would fetch neighbours over the network). Local
    blobs: KEEP_CACHE, so the view's readahead serves many small files with one READ."""
    image = open_bootstrap(img.boot)
    try:
        fs = BlobViewFilesystem(image, BlobDevice(image, LocalBlobDir(img.blob_dir)), local=local)
        assert fs.open(FIRST_BLOB, os.O_RDONLY) == (0, flags)
    finally:
        image.close()

