"""WritableVfs: mutating requests reach a writable filesystem under a path, never a RAFS image or
the pseudo directories (the Kata share layout, through the kernel stand-in)."""

import errno
import os
import stat
import struct
from pathlib import Path

from nydus_py.fs.passthrough import PassthroughFilesystem
from nydus_py.fs.writable_vfs import WritableVfs
from nydus_py.fuse.protocol import FuseSession

from ..fuse import kernel as K
from ..fuse.kernel import Kernel, decode_entry_out
from ..fuse.memfs import MemFS


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
