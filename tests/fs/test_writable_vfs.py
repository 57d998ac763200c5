"""WritableVfs: mutating requests reach a writable filesystem under a path, never a RAFS image or
the pseudo directories (the Kata share layout, through the kernel stand-in)."""

import errno
import os
import stat
import struct
from pathlib import Path

import pytest

from nydus_py.builder.options import BuildOptions
from nydus_py.fs.passthrough import PassthroughFilesystem
from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fs.writable_vfs import WritableVfs
from nydus_py.fuse.abi import InitFlags
from nydus_py.fuse.protocol import FuseSession
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.vfs.vfs import VfsError

from ..fuse import kernel as K
from ..fuse.kernel import Kernel, decode_entry_out, decode_init_out
from ..fuse.memfs import MemFS
from .mountrig import CHUNK, build


def lookup(k: Kernel, parent: int, name: bytes) -> int:
    err, p = k.lookup(parent, name)
    assert err == 0, (name, errno.errorcode.get(err))
    return int(decode_entry_out(p)["nodeid"])


def test_kata_layout_routes_writes(tmp_path: Path) -> None:
    share = tmp_path / "containers"
    share.mkdir()
    (share / "existing").write_bytes(b"x")
    vfs = WritableVfs()
    vfs.mount("/containers", PassthroughFilesystem(str(share)))
    vfs.mount("/rafs/c1/lowerdir", MemFS())
    k = Kernel(FuseSession(vfs))
    k.uid = k.gid = 0
    init_err, _ = k.init(38)
    assert init_err == 0
    c = lookup(k, 1, b"containers")
    err, p = k.call(K.MKDIR, c, struct.pack("<II", 0o755, 0) + b"newdir\0")
    assert err == 0
    newdir = int(decode_entry_out(p)["nodeid"])
    assert newdir >> 56 == c >> 56 and (share / "newdir").is_dir()
    err, p = k.call(K.CREATE, newdir, struct.pack("<IIII", os.O_RDWR | os.O_CREAT, stat.S_IFREG | 0o644, 0, 0)
                    + b"f\0")
    assert err == 0
    f = int(decode_entry_out(p[:128])["nodeid"])
    fh = struct.unpack_from("<Q", p, 128)[0]
    err, p = k.call(K.WRITE, f, struct.pack("<QQIIQII", fh, 0, 5, 0, 0, 0, 0) + b"hello")
    assert err == 0 and (share / "newdir" / "f").read_bytes() == b"hello"
    assert k.call(K.RENAME, newdir, struct.pack("<Q", c) + b"f\0g\0")[0] == 0
    assert (share / "g").read_bytes() == b"hello"
    # the image and the pseudo directories are read-only; nothing moves between filesystems
    lower = lookup(k, lookup(k, lookup(k, 1, b"rafs"), b"c1"), b"lowerdir")
    assert k.call(K.MKDIR, lower, struct.pack("<II", 0o755, 0) + b"x\0")[0] == errno.EROFS
    assert k.call(K.MKDIR, 1, struct.pack("<II", 0o755, 0) + b"x\0")[0] == errno.EROFS
    hello = lookup(k, lower, b"hello")
    assert k.open(hello, os.O_WRONLY)[0] == errno.EROFS
    assert k.open(hello, os.O_RDONLY)[0] == 0
    assert k.call(K.RENAME, c, struct.pack("<Q", lower) + b"g\0g\0")[0] == errno.EXDEV
    assert k.call(K.LINK, lower, struct.pack("<Q", f) + b"h\0")[0] == errno.EXDEV
    # reads of the passthrough still go through its own open handles
    g = lookup(k, c, b"g")
    err, p = k.open(g, os.O_RDONLY)
    assert err == 0
    gfh = struct.unpack_from("<Q", p)[0]
    assert k.read(g, gfh, 0, 100) == (0, b"hello")


def _rafs(tmp_path: Path) -> RafsFilesystem:
    src = tmp_path / "src"
    src.mkdir(parents=True)
    (src / "f").write_bytes(b"image bytes\n")
    (src / "d").mkdir()
    img = build(str(src), str(tmp_path / "img"), BuildOptions(chunk_size=CHUNK), views=False)
    image = open_bootstrap(img.boot)
    return RafsFilesystem(image, BlobDevice(image, LocalBlobDir(img.blob_dir), validate=False))


def test_a_read_only_image_as_the_share_skips_open(tmp_path: Path) -> None:
    """`nydusd-py virtiofs --bootstrap`: the image at / is the whole share. The connection is
    set up as over /dev/fuse: no OPEN/OPENDIR (the guest sends LOOKUP and READ per file), and
    every mutation is EROFS, a write OPEN too."""
    vfs = WritableVfs()
    vfs.mount("/", _rafs(tmp_path))
    k = Kernel(FuseSession(vfs))
    err, p = k.init(45)
    assert err == 0
    flags = decode_init_out(p)["flags"]
    assert flags & InitFlags.NO_OPEN_SUPPORT and flags & InitFlags.NO_OPENDIR_SUPPORT
    f = lookup(k, 1, b"f")
    assert k.open(f, os.O_WRONLY)[0] == errno.EROFS  # refused, never "opened" by the kernel
    assert k.open(f, os.O_RDONLY) == (errno.ENOSYS, b"")  # the kernel stops sending OPEN/RELEASE
    assert k.open(1, os.O_RDONLY, opcode=K.OPENDIR) == (errno.ENOSYS, b"")
    assert k.read(f, 0, 0, 100) == (0, b"image bytes\n")
    assert k.call(K.MKDIR, 1, struct.pack("<II", 0o755, 0) + b"x\0")[0] == errno.EROFS
    # the image goes; a writable filesystem cannot take its place on this connection
    vfs.umount("/").close()
    share = tmp_path / "share"
    share.mkdir()
    with pytest.raises(VfsError) as e:
        vfs.mount("/", PassthroughFilesystem(str(share)))
    assert e.value.errno == errno.EBUSY
    vfs.mount("/", PassthroughFilesystem(str(share), writable=False))  # a read-only one is fine
    vfs.umount("/").close()
    k.session.reset()  # the guest went away: the next one negotiates again
    vfs.mount("/", PassthroughFilesystem(str(share)))
    err, p = k.init(45)
    assert err == 0
    assert not decode_init_out(p)["flags"] & (InitFlags.NO_OPEN_SUPPORT | InitFlags.NO_OPENDIR_SUPPORT)
    assert k.call(K.MKDIR, 1, struct.pack("<II", 0o755, 0) + b"x\0")[0] == 0 and (share / "x").is_dir()


def test_shares_with_pseudo_directories_or_a_writable_root_keep_open(tmp_path: Path) -> None:
    """A RAFS image under a path (Kata's layout) or a writable passthrough at /: the kernel
    keeps sending OPEN (a passthrough's reads need its handles)."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "g").write_bytes(b"host\n")
    for layout in ("kata", "writable root"):
        vfs = WritableVfs()
        if layout == "kata":
            vfs.mount("/rafs/c1/lowerdir", _rafs(tmp_path / layout.replace(" ", "_")))
            vfs.mount("/containers", PassthroughFilesystem(str(share)))
        else:
            vfs.mount("/", PassthroughFilesystem(str(share)))
        k = Kernel(FuseSession(vfs))
        err, p = k.init(45)
        assert err == 0
        assert not decode_init_out(p)["flags"] & (InitFlags.NO_OPEN_SUPPORT | InitFlags.NO_OPENDIR_SUPPORT)
        d = 1 if layout != "kata" else lookup(k, 1, b"containers")
        err, p = k.open(lookup(k, d, b"g"), os.O_RDONLY)
        assert err == 0 and struct.unpack_from("<Q", p)[0] > 0
