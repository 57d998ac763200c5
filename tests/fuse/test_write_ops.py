"""Mutating opcodes through FuseSession for a filesystem that opts in (`writable = True`): every
request is built as fs/fuse/*.c lays it out and the filesystem must see exactly its arguments."""

import errno
import os
import stat
import struct
from typing import Any

import pytest

from nydus_py.fuse.abi import FATTR_FH, FATTR_MODE, FATTR_MTIME, FATTR_MTIME_NOW, FATTR_SIZE
from nydus_py.fuse.api import Caller, Entry, FuseAttr, FuseError, SetAttr
from nydus_py.fuse.protocol import FuseSession

from . import kernel as K
from .kernel import Kernel, decode_attr_out, decode_entry_out
from .memfs import MemFS


class WritableMemFS(MemFS):
    """MemFS that records every mutating call and answers with a fixed new inode 99."""

    writable = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []

    def _new(self) -> Entry:
        return Entry(99, 3, FuseAttr(ino=99, mode=stat.S_IFREG | 0o640, size=5), 1.5, 2.0)

    def setattr(self, ino: int, attr: SetAttr) -> tuple[FuseAttr, float]:
        self.calls.append(("setattr", ino, attr))
        return FuseAttr(ino=ino, size=attr.size, mode=stat.S_IFREG | 0o600), 4.0

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Entry:
        self.calls.append(("mknod", parent, name, mode, rdev, caller))
        return self._new()

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Entry:
        self.calls.append(("mkdir", parent, name, mode, caller))
        return self._new()

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Entry:
        self.calls.append(("symlink", parent, name, target, caller))
        return self._new()

    def link(self, ino: int, newparent: int, newname: bytes) -> Entry:
        self.calls.append(("link", ino, newparent, newname))
        return self._new()

    def unlink(self, parent: int, name: bytes) -> None:
        self.calls.append(("unlink", parent, name))

    def rmdir(self, parent: int, name: bytes) -> None:
        if name == b"full":
            raise FuseError(errno.ENOTEMPTY)
        self.calls.append(("rmdir", parent, name))

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        self.calls.append(("rename", parent, name, newparent, newname, flags))

    def create(self, parent: int, name: bytes, mode: int, flags: int, caller: Caller) -> tuple[Entry, int, int]:
        self.calls.append(("create", parent, name, mode, flags, caller))
        return self._new(), 77, 0

    def write(self, ino: int, fh: int, offset: int, data: memoryview, flags: int) -> int:
        self.calls.append(("write", ino, fh, offset, bytes(data), flags))
        return len(data) - (1 if data[:1] == b"s" else 0)

    def fsync(self, ino: int, fh: int, datasync: bool) -> None:
        self.calls.append(("fsync", ino, fh, datasync))

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        self.calls.append(("setxattr", ino, name, value, flags))

    def removexattr(self, ino: int, name: bytes) -> None:
        self.calls.append(("removexattr", ino, name))

    def fallocate(self, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        self.calls.append(("fallocate", ino, fh, offset, length, mode))


@pytest.fixture
def fs() -> WritableMemFS:
    return WritableMemFS()


@pytest.fixture
def k(fs: WritableMemFS) -> Kernel:
    kern = Kernel(FuseSession(fs))
    assert kern.init(38)[0] == 0
    return kern


def entry_of(p: bytes) -> dict[str, Any]:
    e = decode_entry_out(p)
    assert e["nodeid"] == 99 and e["generation"] == 3
    assert (e["entry_valid"], e["entry_valid_nsec"], e["attr_valid"]) == (1, 500_000_000, 2)
    return e


def test_mkdir_mknod_symlink_link(k: Kernel, fs: WritableMemFS) -> None:
    err, p = k.call(K.MKDIR, 1, struct.pack("<II", 0o40755, 0o022) + b"dir\0")
    assert err == 0 and entry_of(p)["attr"]["size"] == 5
    err, p = k.call(K.MKNOD, 1, struct.pack("<IIII", stat.S_IFIFO | 0o600, 0, 0o022, 0) + b"fifo\0")
    assert err == 0
    err, p = k.call(K.SYMLINK, 1, b"ln\0../target/x\0")
    assert err == 0
    err, p = k.call(K.LINK, 3, struct.pack("<Q", 2) + b"hard\0")
    assert err == 0
    caller = Caller(1000, 1000)
    assert fs.calls == [
        ("mkdir", 1, b"dir", 0o40755, caller),
        ("mknod", 1, b"fifo", stat.S_IFIFO | 0o600, 0, caller),
        ("symlink", 1, b"ln", b"../target/x", caller),
        ("link", 2, 3, b"hard"),
    ]


def test_create_reply_is_entry_plus_open(k: Kernel, fs: WritableMemFS) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    err, p = k.call(K.CREATE, 1, struct.pack("<IIII", flags, stat.S_IFREG | 0o644, 0o022, 0) + b"new\0")
    assert err == 0 and len(p) == 128 + 16
    entry_of(p[:128])
    fh, open_flags, backing = struct.unpack("<QIi", p[128:])
    assert (fh, open_flags, backing) == (77, 0, 0)
    assert fs.calls == [("create", 1, b"new", stat.S_IFREG | 0o644, flags, Caller(1000, 1000))]


def test_write_and_short_write(k: Kernel, fs: WritableMemFS) -> None:
    data = b"hello world"
    err, p = k.call(K.WRITE, 2, struct.pack("<QQIIQII", 5, 4096, len(data), 0, 0, 0o100002, 0) + data)
    assert err == 0 and struct.unpack("<II", p) == (len(data), 0)
    err, p = k.call(K.WRITE, 2, struct.pack("<QQIIQII", 5, 0, 5, 0, 0, 0, 0) + b"short")
    assert err == 0 and struct.unpack("<II", p) == (4, 0)
    assert fs.calls[0] == ("write", 2, 5, 4096, data, 0o100002)
    # the size field must match the data that follows
    assert k.call(K.WRITE, 2, struct.pack("<QQIIQII", 5, 0, 100, 0, 0, 0, 0) + b"abc")[0] == errno.EINVAL
    assert k.call(K.WRITE, 2, struct.pack("<QQIIQII", 5, 1 << 63, 3, 0, 0, 0, 0) + b"abc")[0] == errno.EFBIG


def test_setattr_fields(k: Kernel, fs: WritableMemFS) -> None:
    valid = FATTR_MODE | FATTR_SIZE | FATTR_FH | FATTR_MTIME | FATTR_MTIME_NOW
    args = struct.pack("<IIQQQQQQIIIIIIII", valid, 0, 55, 1234, 0, 11, 22, 33, 1, 2, 3, 0o100600, 0, 7, 8, 0)
    err, p = k.call(K.SETATTR, 2, args)
    assert err == 0
    o = decode_attr_out(p)
    assert o["attr_valid"] == 4 and o["attr"]["size"] == 1234
    _, ino, sa = fs.calls[0]
    assert ino == 2
    assert sa == SetAttr(valid, 55, 1234, 11, 1, 22, 2, 0o100600, 7, 8)
    # without FATTR_FH the fh field is not a handle
    k.call(K.SETATTR, 2, struct.pack("<IIQQQQQQIIIIIIII", FATTR_SIZE, 0, 55, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    assert fs.calls[1][2].fh is None


def test_unlink_rmdir_rename(k: Kernel, fs: WritableMemFS) -> None:
    assert k.call(K.UNLINK, 1, b"hello\0") == (0, b"")
    assert k.call(K.RMDIR, 1, b"sub\0") == (0, b"")
    assert k.call(K.RMDIR, 1, b"full\0") == (errno.ENOTEMPTY, b"")
    assert k.call(K.RENAME, 1, struct.pack("<Q", 3) + b"a\0b\0") == (0, b"")
    assert k.call(K.RENAME2, 1, struct.pack("<QII", 3, 1, 0) + b"c\0d\0") == (0, b"")
    assert fs.calls == [("unlink", 1, b"hello"), ("rmdir", 1, b"sub"), ("rename", 1, b"a", 3, b"b", 0),
                        ("rename", 1, b"c", 3, b"d", 1)]


def test_xattr_fsync_fallocate(k: Kernel, fs: WritableMemFS) -> None:
    assert k.call(K.SETXATTR, 2, struct.pack("<II", 3, 1) + b"user.k\0v\0w") == (0, b"")
    assert k.call(K.REMOVEXATTR, 2, b"user.k\0") == (0, b"")
    assert k.call(K.FSYNC, 2, struct.pack("<QII", 9, 1, 0)) == (0, b"")
    assert k.call(K.FALLOCATE, 2, struct.pack("<QQQII", 9, 10, 20, 0, 0)) == (0, b"")
    assert fs.calls == [("setxattr", 2, b"user.k", b"v\0w", 1), ("removexattr", 2, b"user.k"),
                        ("fsync", 2, 9, True), ("fallocate", 2, 9, 10, 20, 0)]
    # value shorter than its size field; empty name
    assert k.call(K.SETXATTR, 2, struct.pack("<II", 10, 0) + b"user.k\0v")[0] == errno.EINVAL
    assert k.call(K.REMOVEXATTR, 2, b"\0")[0] == errno.EINVAL


def test_malformed_names_are_einval(k: Kernel, fs: WritableMemFS) -> None:
    assert k.call(K.MKDIR, 1, struct.pack("<II", 0o755, 0) + b"no-nul")[0] == errno.EINVAL
    assert k.call(K.SYMLINK, 1, b"only-one\0")[0] == errno.EINVAL
    assert k.call(K.RENAME, 1, struct.pack("<Q", 1) + b"a\0b")[0] == errno.EINVAL
    assert k.call(K.UNLINK, 1, b"a/b\0")[0] == errno.EINVAL
    assert k.call(K.MKDIR, 1, struct.pack("<II", 0o755, 0) + b"..\0")[0] == errno.EINVAL
    assert k.call(K.MKDIR, 1, struct.pack("<I", 0o755))[0] == errno.EINVAL  # truncated in-args
    assert fs.calls == []


def test_open_for_write_reaches_a_writable_fs(k: Kernel, fs: WritableMemFS) -> None:
    err, p = k.open(2, os.O_RDWR)
    assert err == 0 and fs.opened == [(2, os.O_RDWR)]


def test_read_only_filesystem_still_erofs() -> None:
    k = Kernel(FuseSession(MemFS()))
    assert k.init(38)[0] == 0
    assert k.call(K.MKDIR, 1, struct.pack("<II", 0o755, 0) + b"d\0") == (errno.EROFS, b"")
    assert k.call(K.FSYNC, 2, struct.pack("<QII", 0, 0, 0)) == (errno.ENOSYS, b"")
    assert k.open(2, os.O_WRONLY) == (errno.EROFS, b"")


def test_default_methods_answer_enosys() -> None:
    class Half(MemFS):
        writable = True

    k = Kernel(FuseSession(Half()))
    k.init(38)
    assert k.call(K.MKDIR, 1, struct.pack("<II", 0o755, 0) + b"d\0") == (errno.ENOSYS, b"")
    assert k.call(K.COPY_FILE_RANGE, 2, b"\0" * 56) == (errno.ENOSYS, b"")
