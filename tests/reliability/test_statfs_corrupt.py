"""statfs on a damaged image (issue 16, item 7): answered from the superblock, so a corrupt inode
deep in the tree neither makes every statfs walk the tree, log a traceback and fail with EIO,
nor costs anything per call. The numbers are checked against what the builder wrote."""

import errno
import logging
import struct
from pathlib import Path

import pytest

from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_directory
from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fuse.protocol import FuseSession
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.errors import FormatError
from nydus_py.rafs.model import RafsImage
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from tests.fuse import kernel as K
from tests.fuse.kernel import Kernel
from tests.storage import images

V5_SUPERBLOCK_SIZE = 8192  # the v5 inode table (u32 record offsets / 8) follows the superblock
V6_BLOCK = 4096


def _build(work: Path, version: int) -> tuple[Path, Path, int]:
    """A real image of `version`; returns (bootstrap, blob dir, inodes the builder wrote)."""
    src = work / "src"
    images.make_tree(src)
    blobs = work / "blobs"
    blobs.mkdir()
    opts = BuildOptions(chunk_size=images.CHUNK, fs_version=version)
    res = build_image(tree_from_directory(src), str(work / "image.boot"), str(blobs), opts)
    return work / "image.boot", blobs, res.inodes


def _corrupt(boot: Path, version: int) -> None:
    """Break the inode of /small/f05 the way a bit flip would, leaving the superblock and the
    root intact (the image still opens, only a walk trips over it)."""
    img = open_bootstrap(str(boot))
    small = img.lookup(img.root_ino, b"small")
    assert small is not None
    victim = img.lookup(small, b"f05")
    assert victim is not None
    meta_blkaddr = getattr(img, "meta_blkaddr", 0)
    img.close()
    raw = bytearray(boot.read_bytes())
    if version == 5:
        struct.pack_into("<I", raw, V5_SUPERBLOCK_SIZE + 4 * (victim - 1), 0xFFFFFFFF)  # record past EOF
    else:
        struct.pack_into("<H", raw, meta_blkaddr * V6_BLOCK + victim * 32, 0xFFFF)  # bad i_format
    boot.write_bytes(bytes(raw))


@pytest.fixture(params=[5, 6], ids=["v5", "v6"])
def damaged(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[RafsImage, BlobDevice, int]:
    version = request.param
    boot, blobs, inodes = _build(tmp_path, version)
    _corrupt(boot, version)
    img = open_bootstrap(str(boot))
    with pytest.raises(FormatError):  # the damage is real: a full walk/count fails
        img.inode_count()
    dev = BlobDevice(img, LocalBlobDir(str(blobs)))
    yield img, dev, inodes
    img.close()


def test_statfs_answers_from_the_superblock(damaged, caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    img, dev, inodes = damaged
    k = Kernel(FuseSession(RafsFilesystem(img, dev, readahead_chunks=0)))
    assert k.init(45)[0] == 0
    calls: list[str] = []

    def spy(name: str) -> None:  # counts, then does the real (failing) work
        real = getattr(img, name)

        def wrapped(*a: object, **kw: object) -> object:
            calls.append(name)
            return real(*a, **kw)

        monkeypatch.setattr(img, name, wrapped)

    spy("inode_count")
    spy("readdir")
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            err, p = k.call(K.STATFS, 1)
            assert err == 0, errno.errorcode.get(err)
            blocks, bfree, bavail, files, ffree, bsize, namelen, frsize = struct.unpack_from("<5Q3I", p)
            assert files == inodes and (namelen, bsize) == (255, 4096)
    assert not calls  # no tree walk per call (nor once)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    # the rest of the tree still works, the broken inode is EIO as before
    small = k.call(K.LOOKUP, 1, b"small\0")
    assert small[0] == 0


def test_a_failed_inode_count_is_cached(damaged, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever still asks for the exact count (inspect, tests) pays for the failing walk once:
    the image never changes, so neither does the answer."""
    img, _dev, _inodes = damaged
    with pytest.raises(FormatError) as first:
        img.inode_count()
    work = "readdir" if img.version == 6 else "_record_offset"  # what the count is made of
    real = getattr(img, work)
    calls: list[int] = []

    def wrapped(*a: object, **kw: object) -> object:
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(img, work, wrapped)
    for _ in range(3):
        with pytest.raises(FormatError) as again:
            img.inode_count()
        assert str(again.value) == str(first.value)
    assert not calls
