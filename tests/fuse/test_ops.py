"""Every read-only operation through FuseSession, replies decoded byte by byte."""

import errno
import logging
import os
import stat
import struct

import pytest

from nydus_py.fuse.abi import InitFlags
from nydus_py.fuse.api import DEFAULT_WANT, Filesystem, FuseAttr
from nydus_py.fuse.protocol import FuseSession, notify_delete, notify_inval_entry, notify_inval_inode

from . import kernel as K
from .kernel import Kernel, decode_attr_out, decode_direntplus, decode_dirents, decode_entry_out
from .memfs import ATTR_TIMEOUT, ENTRY_TIMEOUT, MTIME, MemFS


@pytest.fixture
def fs() -> MemFS:
    return MemFS()


@pytest.fixture
def k(fs: MemFS) -> Kernel:
    kern = Kernel(FuseSession(fs))
    assert kern.init(45)[0] == 0
    return kern


def test_lookup_entry_out(k: Kernel) -> None:
    err, p = k.lookup(1, b"hello")
    assert err == 0
    e = decode_entry_out(p)
    assert e["nodeid"] == 2 and e["generation"] == 7
    assert (e["entry_valid"], e["entry_valid_nsec"]) == (3600, 0)
    assert (e["attr_valid"], e["attr_valid_nsec"]) == (2, 500_000_000)
    a = e["attr"]
    assert a == {"ino": 2, "size": 12, "blocks": 1, "atime": MTIME, "mtime": MTIME + 2, "ctime": MTIME,
                 "atimensec": 0, "mtimensec": 123_456_789, "ctimensec": 0, "mode": stat.S_IFREG | 0o644,
                 "nlink": 1, "uid": 1000, "gid": 100, "rdev": 0, "blksize": 4096, "flags": 0}


def test_lookup_dot_dotdot_and_nested(k: Kernel) -> None:
    assert decode_entry_out(k.lookup(3, b"..")[1])["nodeid"] == 1
    assert decode_entry_out(k.lookup(3, b".")[1])["nodeid"] == 3
    assert decode_entry_out(k.lookup(3, b"deep")[1])["attr"]["size"] == 10240


def test_lookup_errors(k: Kernel) -> None:
    assert k.lookup(1, b"missing") == (errno.ENOENT, b"")
    assert k.lookup(2, b"x") == (errno.ENOTDIR, b"")
    assert k.lookup(99, b"x") == (errno.ENOENT, b"")
    assert k.lookup(1, b"denied") == (errno.EACCES, b"")  # a plain OSError keeps its errno
    # a name without its NUL is malformed
    assert k.call(K.LOOKUP, 1, b"hello")[0] == errno.EINVAL


def test_lookup_negative_entry_is_cached_not_an_error(k: Kernel) -> None:
    err, p = k.lookup(1, b"negative")
    assert err == 0
    e = decode_entry_out(p)
    assert e["nodeid"] == 0 and e["entry_valid"] == 5 and e["attr"]["mode"] == 0


def test_fs_exceptions_become_eio(k: Kernel, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="nydus_py.fuse"):
        assert k.lookup(1, b"boom") == (errno.EIO, b"")
        assert k.lookup(1, b"noerrno") == (errno.EIO, b"")
    assert "lookup exploded" in caplog.text
    assert "LOOKUP" in caplog.text
    # the session is still fine afterwards
    assert k.lookup(1, b"hello")[0] == 0


def test_getattr(k: Kernel) -> None:
    err, p = k.getattr(3)
    assert err == 0
    o = decode_attr_out(p)
    assert (o["attr_valid"], o["attr_valid_nsec"]) == (2, 500_000_000)
    assert o["attr"]["ino"] == 3 and o["attr"]["mode"] == stat.S_IFDIR | 0o755 and o["attr"]["nlink"] == 2
    assert k.getattr(1234)[0] == errno.ENOENT


def test_getattr_pre_1970_times() -> None:
    class Old(MemFS):
        def getattr(self, ino: int) -> tuple[FuseAttr, float]:
            return self.attr(ino)._replace(atime=-1, mtime=-86400, ctime=0), 1.0

    k = Kernel(FuseSession(Old()))
    k.init(45)
    err, p = k.getattr(2)
    assert err == 0
    assert struct.unpack_from("<qqq", p, 16 + 24) == (-1, -86400, 0)


def test_readlink(k: Kernel) -> None:
    assert k.call(K.READLINK, 5) == (0, b"hello")
    assert k.call(K.READLINK, 2) == (errno.EINVAL, b"")


def test_open_read_release(k: Kernel, fs: MemFS) -> None:
    err, p = k.open(4, os.O_RDONLY | os.O_NOFOLLOW)
    assert err == 0
    fh, open_flags, backing = struct.unpack("<QIi", p)
    assert (fh, open_flags, backing) == (104, 2, 0)  # FOPEN_KEEP_CACHE
    assert fs.opened == [(4, os.O_RDONLY | os.O_NOFOLLOW)]
    data = bytes(range(256)) * 40
    assert k.read(4, fh, 0, 4096) == (0, data[:4096])
    assert k.read(4, fh, 10000, 4096) == (0, data[10000:])  # short at EOF
    assert k.read(4, fh, 20000, 4096) == (0, b"")  # past EOF
    assert k.read(4, 5, 0, 10)[0] == errno.EBADF
    assert k.release(4, fh) == (0, b"")
    assert fs.released == [(4, 104)]


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_APPEND])
def test_open_for_writing_is_erofs(k: Kernel, fs: MemFS, flags: int) -> None:
    assert k.open(2, flags) == (errno.EROFS, b"")
    assert fs.opened == []


def test_read_longer_than_asked_is_truncated(fs: MemFS) -> None:
    class Greedy(MemFS):
        def read(self, ino: int, fh: int, offset: int, size: int) -> bytes:
            return b"z" * (size + 100)

    k = Kernel(FuseSession(Greedy()))
    k.init(45)
    assert k.read(2, 102, 0, 5) == (0, b"zzzzz")


def test_handle_vectored_matches_handle(fs: MemFS) -> None:
    session = FuseSession(fs)
    k = Kernel(session)
    k.init(45)
    for opcode, nodeid, args in [
        (K.READ, 4, struct.pack("<QQIIQII", 104, 100, 3000, 0, 0, 0, 0)),
        (K.GETATTR, 2, bytes(16)),
        (K.LOOKUP, 1, b"nope\0"),
    ]:
        _, req = k.build(opcode, nodeid, args, unique=10)
        vec = session.handle_vectored(req)
        assert vec is not None
        assert b"".join(vec) == session.handle(req)
    _, req = k.build(K.FORGET, 2, struct.pack("<Q", 1))
    assert session.handle_vectored(req) is None


def test_flush_defaults_to_enosys_so_the_kernel_stops_sending_it(k: Kernel) -> None:
    assert k.call(K.FLUSH, 2, struct.pack("<QIIQ", 102, 0, 0, 0)) == (errno.ENOSYS, b"")


def test_opendir_readdir_releasedir(k: Kernel, fs: MemFS) -> None:
    err, p = k.open(1, os.O_RDONLY | os.O_DIRECTORY, opcode=K.OPENDIR)
    assert err == 0
    fh, open_flags, _ = struct.unpack("<QIi", p)
    assert fh == 201 and open_flags == 2 | 8  # KEEP_CACHE | CACHE_DIR
    err, p = k.read(1, fh, 0, 4096, opcode=K.READDIR)
    assert err == 0
    ents = decode_dirents(p)
    assert [(e[3], e[0], e[2], e[1]) for e in ents] == [
        (b".", 1, 4, 1), (b"..", 1, 4, 2), (b"hello", 2, 8, 3), (b"sub", 3, 4, 4), (b"link", 5, 10, 5),
        (b"many", 6, 4, 6)]
    assert k.release(1, fh, opcode=K.RELEASEDIR) == (0, b"")
    assert fs.released == [(1, 201)]
    assert k.read(2, 0, 0, 4096, opcode=K.READDIR)[0] == errno.ENOTDIR


@pytest.mark.parametrize("size", [32, 40, 48, 100, 333, 4096])
def test_readdir_small_buffers_pack_and_resume(k: Kernel, fs: MemFS, size: int) -> None:
    expected = [b".", b".."] + list(fs.nodes[6].children)
    got: list[bytes] = []
    offset = 0
    for _ in range(200):
        err, p = k.read(6, 206, offset, size, opcode=K.READDIR)
        assert err == 0
        assert len(p) <= size
        ents = decode_dirents(p)
        if not ents:
            break
        got += [e[3] for e in ents]
        offset = ents[-1][1]
    if size < 24 + 255:
        # the 255-byte name never fits: listing stops there (empty reply), never a split entry
        assert got == expected[:-1]
    else:
        assert got == expected


def test_readdirplus(k: Kernel, fs: MemFS) -> None:
    err, p = k.read(1, 201, 0, 4096, opcode=K.READDIRPLUS)
    assert err == 0
    ents = decode_direntplus(p)
    names = [e[4] for e in ents]
    assert names == [b".", b"..", b"hello", b"sub", b"link", b"many"]
    dot = ents[0]
    assert dot[0]["nodeid"] == 0 and dot[1] == 1 and dot[3] == 4  # no lookup for "." (d_ino from attr)
    hello = ents[2]
    assert hello[0]["nodeid"] == 2 and hello[0]["entry_valid"] == int(ENTRY_TIMEOUT)
    assert hello[0]["attr"]["size"] == 12 and hello[0]["attr_valid_nsec"] == 500_000_000
    assert (hello[1], hello[2], hello[3]) == (2, 3, 8)
    link = ents[4]
    assert link[0]["attr"]["mode"] == stat.S_IFLNK | 0o777 and link[3] == 10  # DT_LNK
    assert int(ATTR_TIMEOUT) == hello[0]["attr_valid"]


@pytest.mark.parametrize("size", [160, 200, 500, 4096])
def test_readdirplus_small_buffers_resume(k: Kernel, fs: MemFS, size: int) -> None:
    expected = [b".", b".."] + list(fs.nodes[6].children)
    got: list[bytes] = []
    offset = 0
    while True:
        err, p = k.read(6, 206, offset, size, opcode=K.READDIRPLUS)
        assert err == 0 and len(p) <= size
        ents = decode_direntplus(p)
        if not ents:
            break
        for entry, ino, _off, _typ, name in ents:
            if name not in (b".", b".."):
                assert entry["nodeid"] == ino == fs.nodes[6].children[name]
        got += [e[4] for e in ents]
        offset = ents[-1][2]
    assert got == (expected if size >= 152 + 255 else expected[:-1])


def test_readdirplus_gives_back_the_lookup_of_an_entry_that_did_not_fit() -> None:
    """READDIRPLUS looks an entry up before it knows the entry fits; one that does not is
    forgotten again, or each full reply would leak one lookup (a passthrough share then keeps
    that inode's fd open until the guest goes away)."""

    class Counting(MemFS):
        lookups = 0

        def lookup(self, parent: int, name: bytes):  # type: ignore[no-untyped-def]
            e = super().lookup(parent, name)
            if e.ino:
                self.lookups += 1
            return e

    fs = Counting()
    k = Kernel(FuseSession(fs))
    k.init(45)
    sent = 0
    offset = 0
    rounds = 0
    while True:
        err, p = k.read(6, 206, offset, 500, opcode=K.READDIRPLUS)
        assert err == 0
        ents = decode_direntplus(p)
        if not ents:
            break
        rounds += 1
        sent += sum(1 for e in ents if e[0]["nodeid"])
        offset = ents[-1][2]
    assert rounds > 2
    given_back = sum(n for _, n in fs.forgets)
    assert given_back > 0
    assert fs.lookups - given_back == sent


def test_readdir_skips_names_the_kernel_would_reject(fs: MemFS, caplog: pytest.LogCaptureFixture) -> None:
    class BadNames(MemFS):
        def readdir(self, ino: int, fh: int, offset: int):  # type: ignore[no-untyped-def]
            yield b"", 9, stat.S_IFREG, 1
            yield b"a/b", 9, stat.S_IFREG, 2
            yield b"n" * 1025, 9, stat.S_IFREG, 3
            yield b"ok", 9, stat.S_IFREG, 4

    k = Kernel(FuseSession(BadNames()))
    k.init(45)
    with caplog.at_level(logging.ERROR):
        err, p = k.read(1, 0, 0, 8192, opcode=K.READDIR)
    assert err == 0 and [e[3] for e in decode_dirents(p)] == [b"ok"]
    assert "invalid name" in caplog.text


def test_statfs(k: Kernel, fs: MemFS) -> None:
    err, p = k.call(K.STATFS, 1)
    assert err == 0 and len(p) == 80
    blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, pad = struct.unpack_from("<5Q4I", p)
    assert (blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, pad) == (
        1000, 0, 0, len(fs.nodes), 0, 4096, 255, 4096, 0)
    assert p[56:] == b"\0" * 24


def test_getxattr_probe_exact_erange_enodata(k: Kernel) -> None:
    err, p = k.getxattr(2, b"user.greeting", 0)
    assert err == 0 and struct.unpack("<II", p) == (8, 0)
    assert k.getxattr(2, b"user.greeting", 8) == (0, b"hi there")
    assert k.getxattr(2, b"user.greeting", 4096) == (0, b"hi there")
    assert k.getxattr(2, b"user.greeting", 7) == (errno.ERANGE, b"")
    assert k.getxattr(2, b"user.nope", 0) == (errno.ENODATA, b"")
    assert k.getxattr(2, b"user.nope", 100) == (errno.ENODATA, b"")
    assert k.getxattr(2, b"user.empty", 0) == (0, struct.pack("<II", 0, 0))
    assert k.getxattr(2, b"user.empty", 10) == (0, b"")
    assert k.getxattr(2, b"security.x", 2) == (0, b"\x00\x01")
    # name without NUL
    assert k.call(K.GETXATTR, 2, struct.pack("<II", 10, 0) + b"user.greeting")[0] == errno.EINVAL


def test_listxattr_probe_erange_full(k: Kernel) -> None:
    names = b"user.greeting\0user.empty\0security.x\0"
    err, p = k.listxattr(2, 0)
    assert err == 0 and struct.unpack("<II", p) == (len(names), 0)
    assert k.listxattr(2, len(names)) == (0, names)
    assert k.listxattr(2, len(names) - 1) == (errno.ERANGE, b"")
    assert k.listxattr(3, 0) == (0, struct.pack("<II", 0, 0))


def test_xattrs_default_to_enosys() -> None:
    class NoXattr(MemFS):
        getxattr = Filesystem.getxattr
        listxattr = Filesystem.listxattr

    k = Kernel(FuseSession(NoXattr()))
    k.init(45)
    assert k.getxattr(2, b"user.greeting", 0) == (errno.ENOSYS, b"")
    assert k.listxattr(2, 0) == (errno.ENOSYS, b"")


def test_access_passes_caller_credentials(k: Kernel, fs: MemFS) -> None:
    assert k.call(K.ACCESS, 2, struct.pack("<II", os.R_OK, 0)) == (0, b"")
    assert k.call(K.ACCESS, 2, struct.pack("<II", os.W_OK, 0)) == (errno.EACCES, b"")
    assert fs.access_calls == [(2, os.R_OK, 1000, 1000), (2, os.W_OK, 1000, 1000)]


def test_lseek(k: Kernel) -> None:
    err, p = k.call(K.LSEEK, 2, struct.pack("<QQII", 102, 3, 3, 0))  # SEEK_DATA
    assert err == 0 and struct.unpack("<Q", p) == (3,)
    err, p = k.call(K.LSEEK, 2, struct.pack("<QQII", 102, 3, 4, 0))  # SEEK_HOLE
    assert err == 0 and struct.unpack("<Q", p) == (12,)
    assert k.call(K.LSEEK, 2, struct.pack("<QQII", 102, 50, 3, 0))[0] == errno.ENXIO


MUTATING = {
    K.SETATTR: struct.pack("<IIQQQQQQIIIIIIII", 1 << 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    K.SYMLINK: b"new\0target\0",
    K.MKNOD: struct.pack("<IIII", stat.S_IFIFO | 0o644, 0, 0o22, 0) + b"fifo\0",
    K.MKDIR: struct.pack("<II", 0o755, 0o22) + b"dir\0",
    K.UNLINK: b"hello\0",
    K.RMDIR: b"sub\0",
    K.RENAME: struct.pack("<Q", 1) + b"hello\0bye\0",
    K.LINK: struct.pack("<Q", 2) + b"hardlink\0",
    K.WRITE: struct.pack("<QQIIQII", 102, 0, 5, 0, 0, 0, 0) + b"data!",
    K.SETXATTR: struct.pack("<IIII", 1, 0, 0, 0) + b"user.x\0" + b"v",
    K.REMOVEXATTR: b"user.greeting\0",
    K.CREATE: struct.pack("<IIII", os.O_WRONLY | os.O_CREAT, 0o644, 0o22, 0) + b"new\0",
    K.FALLOCATE: struct.pack("<QQQII", 102, 0, 4096, 0, 0),
    K.RENAME2: struct.pack("<QII", 1, 0, 0) + b"hello\0bye\0",
    K.COPY_FILE_RANGE: struct.pack("<7Q", 102, 0, 2, 102, 100, 10, 0),
    K.TMPFILE: struct.pack("<IIII", os.O_RDWR, 0o600, 0o22, 0) + b"\0",
    K.COPY_FILE_RANGE_64: struct.pack("<7Q", 102, 0, 2, 102, 100, 10, 0),
}


@pytest.mark.parametrize("opcode", sorted(MUTATING))
def test_every_mutating_op_is_erofs(k: Kernel, opcode: int) -> None:
    assert k.call(opcode, 1, MUTATING[opcode]) == (errno.EROFS, b"")
    assert k.call(opcode, 2, b"") == (errno.EROFS, b"")  # whatever the args


@pytest.mark.parametrize(
    "opcode",
    [K.FSYNC, K.FSYNCDIR, K.SYNCFS, K.GETLK, K.SETLK, K.SETLKW, K.BMAP, K.POLL, K.SETUPMAPPING,
     K.REMOVEMAPPING, K.STATX],
)
def test_ops_the_kernel_may_stop_sending_are_enosys(k: Kernel, opcode: int) -> None:
    assert k.call(opcode, 2, bytes(64)) == (errno.ENOSYS, b"")


@pytest.mark.parametrize("opcode", [0, 7, 19, 54, 99, 4096, 0xFFFFFFFF])
def test_unknown_opcodes_are_enosys(k: Kernel, opcode: int) -> None:
    assert k.call(opcode, 1, bytes(16)) == (errno.ENOSYS, b"")


def test_ioctl_is_enotty(k: Kernel) -> None:
    args = struct.pack("<QIIQII", 102, 0, 0x80086601, 0, 0, 8)  # FS_IOC_GETFLAGS
    assert k.call(K.IOCTL, 2, args) == (errno.ENOTTY, b"")


def test_forget_batch_forget_interrupt_have_no_reply(k: Kernel, fs: MemFS) -> None:
    assert k.send(K.FORGET, 2, struct.pack("<Q", 3)) is None
    batch = struct.pack("<II", 3, 0) + struct.pack("<QQQQQQ", 2, 1, 3, 5, 4, 1)
    assert k.send(K.BATCH_FORGET, 0, batch) is None
    assert fs.forgets == [(2, 3), (2, 1), (3, 5), (4, 1)]
    # a count larger than the entries carried: only what is there
    assert k.send(K.BATCH_FORGET, 0, struct.pack("<II", 9, 0) + struct.pack("<QQ", 6, 2)) is None
    assert fs.forgets[-1] == (6, 2) and len(fs.forgets) == 5
    assert k.send(K.INTERRUPT, 0, struct.pack("<Q", 12)) is None
    assert k.send(K.NOTIFY_REPLY, 0, bytes(40)) is None
    # truncated ones are dropped silently too
    assert k.send(K.FORGET, 2, b"\1") is None
    assert k.send(K.BATCH_FORGET, 0, b"") is None


def test_forget_errors_never_produce_a_reply(fs: MemFS, caplog: pytest.LogCaptureFixture) -> None:
    class Bad(MemFS):
        def forget(self, ino: int, nlookup: int) -> None:
            raise RuntimeError("forget broke")

    k = Kernel(FuseSession(Bad()))
    k.init(45)
    with caplog.at_level(logging.ERROR):
        assert k.send(K.FORGET, 2, struct.pack("<Q", 1)) is None
        assert k.send(K.BATCH_FORGET, 0, struct.pack("<II", 1, 0) + struct.pack("<QQ", 2, 1)) is None
    assert "forget broke" in caplog.text


def test_no_open_support_opt_in() -> None:
    fs = MemFS(want=DEFAULT_WANT | InitFlags.NO_OPEN_SUPPORT | InitFlags.NO_OPENDIR_SUPPORT)
    k = Kernel(FuseSession(fs))
    k.init(45)
    assert k.open(2, os.O_RDONLY) == (errno.ENOSYS, b"")
    assert k.open(1, os.O_RDONLY, opcode=K.OPENDIR) == (errno.ENOSYS, b"")
    assert k.open(2, os.O_WRONLY) == (errno.EROFS, b"")  # still refused, never "opened"
    assert fs.opened == []
    # without the kernel's offer the flag is not negotiated and OPEN goes to the filesystem
    fs2 = MemFS(want=DEFAULT_WANT | InitFlags.NO_OPEN_SUPPORT)
    k2 = Kernel(FuseSession(fs2))
    k2.init(45, flags=0x1 | 0x20)
    assert k2.open(2, os.O_RDONLY)[0] == 0


def test_extensions_are_stripped_from_the_args(k: Kernel) -> None:
    # total_extlen (7.38): 8-byte units of extension data after the args
    ext = struct.pack("<II", 16, 32) + struct.pack("<II", 1, 0)  # a fuse_ext_header + groups
    err, p = k.call(K.LOOKUP, 1, b"hello\0" + ext, extlen=2)
    assert err == 0 and decode_entry_out(p)["nodeid"] == 2
    assert k.call(K.LOOKUP, 1, b"hello\0", extlen=9)[0] == errno.EINVAL  # more extension than request


def test_debug_logging(fs: MemFS, caplog: pytest.LogCaptureFixture) -> None:
    k = Kernel(FuseSession(fs, debug=True))
    with caplog.at_level(logging.DEBUG, logger="nydus_py.fuse"):
        k.init(45)
        k.lookup(1, b"hello")
        k.lookup(1, b"missing")
        k.read(2, 102, 0, 5)
        k.send(K.FORGET, 2, struct.pack("<Q", 1))
    text = caplog.text
    assert "INIT" in text and "major=7" in text and "flags=0x73fffffb" in text
    assert "LOOKUP" in text and "name=b'hello'" in text and "ok len=144" in text
    assert "name=b'missing'" in text and "error ENOENT" in text
    assert "READ" in text and "size=5" in text
    assert "FORGET" in text and "no reply" in text
    assert " us]" in text


def test_notifications() -> None:
    m = notify_inval_inode(7, 0, -1)
    assert struct.unpack("<IiQQqq", m) == (40, 2, 0, 7, 0, -1)
    m = notify_inval_entry(1, b"hello")
    assert struct.unpack_from("<IiQQII", m) == (len(m), 3, 0, 1, 5, 0) and m[32:] == b"hello\0"
    m = notify_delete(1, 2, b"hello")
    assert struct.unpack_from("<IiQQQII", m) == (len(m), 6, 0, 1, 2, 5, 0) and m[40:] == b"hello\0"


def test_readdirplus_packed_by_the_filesystem_is_sent_as_it_is_and_never_past_the_size() -> None:
    """A filesystem's `readdirplus_packed` reply goes out untouched (the session packs nothing);
    b"" ends the listing; more bytes than the kernel asked for is a filesystem bug, answered EIO."""

    class Packed(MemFS):
        payload = b""

        def readdirplus_packed(self, ino: int, fh: int, offset: int, size: int, base: int = 0,
                               dotdot: int = 0) -> bytes:
            return self.payload

    fs = Packed()
    k = Kernel(FuseSession(fs))
    assert k.init(45)[0] == 0
    plain = Kernel(FuseSession(MemFS()))
    assert plain.init(45)[0] == 0
    err, want = plain.read(1, 201, 0, 4096, opcode=K.READDIRPLUS)
    assert err == 0 and want
    fs.payload = want
    assert k.read(1, 201, 0, 4096, opcode=K.READDIRPLUS) == (0, want)
    fs.payload = b""
    assert k.read(1, 201, 0, 4096, opcode=K.READDIRPLUS) == (0, b"")
    fs.payload = want
    assert k.read(1, 201, 0, len(want) - 1, opcode=K.READDIRPLUS)[0] == errno.EIO
