"""A stand-in for the Linux FUSE driver, for driving FuseSession without a mount.

Requests are built the way fs/fuse/*.c lays them out (fuse_in_header, then the op's in-args),
replies are decoded field by field. The formats here are written out from
include/uapi/linux/fuse.h on purpose, independently of nydus_py.fuse.abi, so a wrong struct there
makes these tests fail instead of agreeing with itself.
"""

import struct
from dataclasses import dataclass, field
from typing import Any

from nydus_py.fuse.protocol import FuseSession

# opcodes (fuse.h enum fuse_opcode)
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18
FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 20, 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW, ACCESS, CREATE = 27, 28, 29, 30, 31, 32, 33, 34, 35
INTERRUPT, BMAP, DESTROY, IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE = 36, 37, 38, 39, 40, 41, 42, 43
READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE, SETUPMAPPING, REMOVEMAPPING = 44, 45, 46, 47, 48, 49
SYNCFS, TMPFILE, STATX, COPY_FILE_RANGE_64 = 50, 51, 52, 53

ATTR_FIELDS = ("ino", "size", "blocks", "atime", "mtime", "ctime", "atimensec", "mtimensec", "ctimensec",
               "mode", "nlink", "uid", "gid", "rdev", "blksize", "flags")

# What this machine's 6.18 kernel (protocol 7.45) offers a /dev/fuse mount in FUSE_INIT, as
# measured by test_kernel_mount: every flag bit 0..30 except FILE_OPS, MAP_ALIGNMENT (DAX only)
# and SUBMOUNTS (virtio-fs only); flags2 = SECURITY_CTX, CREATE_SUPP_GROUP, HAS_EXPIRE_ONLY,
# DIRECT_IO_ALLOW_MMAP, PASSTHROUGH, NO_EXPORT_SUPPORT, HAS_RESEND, ALLOW_IDMAP, REQUEST_TIMEOUT.
KERNEL_645_FLAGS = 0x73FFFFFB
KERNEL_645_FLAGS2 = 0x5FD
# Captured from a Debian 6.1 virtio-fs guest (protocol 7.38), see VIRTIOFS-NOTES.md §6.
VIRTIOFS_638_FLAGS, VIRTIOFS_638_FLAGS2 = 0x7BFFFFFB, 0xB
# A 5.15-era kernel at 7.36 and a 5.10-era kernel at 7.31 (no INIT_EXT, 16-byte init_in).
KERNEL_636_FLAGS, KERNEL_636_FLAGS2 = 0x7BFFFFFB, 0x3
KERNEL_631_FLAGS = 0x07FFFFFB


def align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass
class Kernel:
    """Numbers requests like the kernel (even uniques from 2) and talks to one session."""

    session: FuseSession
    minor: int = 45
    unique: int = 0
    uid: int = 1000
    gid: int = 1000
    pid: int = 4242
    sent: list[int] = field(default_factory=list)

    def build(self, opcode: int, nodeid: int = 0, args: bytes = b"", *, unique: int | None = None,
              extlen: int = 0) -> tuple[int, bytes]:
        if unique is None:
            self.unique += 2
            unique = self.unique
        header = struct.pack("<IIQQIIIHH", 40 + len(args), opcode, unique, nodeid, self.uid, self.gid,
                             self.pid, extlen, 0)
        return unique, header + args

    def send(self, opcode: int, nodeid: int = 0, args: bytes = b"", **kw: Any) -> bytes | None:
        """The raw reply (checked to be a well-formed out message for this request) or None."""
        unique, req = self.build(opcode, nodeid, args, **kw)
        self.sent.append(opcode)
        reply = self.session.handle(req)
        if reply is None:
            return None
        assert isinstance(reply, bytes)
        check_out_header(reply, unique)
        return reply

    def call(self, opcode: int, nodeid: int = 0, args: bytes = b"", **kw: Any) -> tuple[int, bytes]:
        """(errno, payload) of a request that must be answered: errno 0 on success."""
        reply = self.send(opcode, nodeid, args, **kw)
        assert reply is not None, f"opcode {opcode} got no reply"
        error = struct.unpack_from("<i", reply, 4)[0]
        return -error, reply[16:]

    # -- the kernel's own requests -------------------------------------------------------------
    def init(self, minor: int | None = None, flags: int = KERNEL_645_FLAGS, flags2: int = KERNEL_645_FLAGS2,
             max_readahead: int = 128 * 1024, major: int = 7) -> tuple[int, bytes]:
        minor = self.minor if minor is None else minor
        if minor >= 36:  # 64-byte fuse_init_in with flags2 (valid only with INIT_EXT)
            args = struct.pack("<IIIII44x", major, minor, max_readahead, flags, flags2)
        else:
            args = struct.pack("<IIII", major, minor, max_readahead, flags)
        return self.call(INIT, 0, args)

    def lookup(self, parent: int, name: bytes) -> tuple[int, bytes]:
        return self.call(LOOKUP, parent, name + b"\0")

    def getattr(self, ino: int, fh: int = 0, flags: int = 0) -> tuple[int, bytes]:
        return self.call(GETATTR, ino, struct.pack("<IIQ", flags, 0, fh))

    def open(self, ino: int, flags: int = 0, opcode: int = OPEN) -> tuple[int, bytes]:
        return self.call(opcode, ino, struct.pack("<II", flags, 0))

    def read(self, ino: int, fh: int, offset: int, size: int, opcode: int = READ) -> tuple[int, bytes]:
        return self.call(opcode, ino, struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0x8000, 0))

    def release(self, ino: int, fh: int, opcode: int = RELEASE) -> tuple[int, bytes]:
        return self.call(opcode, ino, struct.pack("<QIIQ", fh, 0x8000, 0, 0))

    def getxattr(self, ino: int, name: bytes, size: int) -> tuple[int, bytes]:
        return self.call(GETXATTR, ino, struct.pack("<II", size, 0) + name + b"\0")

    def listxattr(self, ino: int, size: int) -> tuple[int, bytes]:
        return self.call(LISTXATTR, ino, struct.pack("<II", size, 0))


def check_out_header(reply: bytes, unique: int) -> None:
    """What fs/fuse/dev.c checks of every reply: len matches, unique echoes, errors carry nothing."""
    assert len(reply) >= 16
    length, error, uniq = struct.unpack_from("<IiQ", reply)
    assert length == len(reply), (length, len(reply))
    assert uniq == unique
    assert -4096 < error <= 0
    if error:
        assert length == 16


def decode_attr(buf: bytes, off: int = 0) -> dict[str, int]:
    return dict(zip(ATTR_FIELDS, struct.unpack_from("<6Q10I", buf, off), strict=True))


def decode_entry_out(p: bytes) -> dict[str, Any]:
    assert len(p) == 128
    nodeid, gen, ev, av, evn, avn = struct.unpack_from("<QQQQII", p)
    return {"nodeid": nodeid, "generation": gen, "entry_valid": ev, "attr_valid": av,
            "entry_valid_nsec": evn, "attr_valid_nsec": avn, "attr": decode_attr(p, 40)}


def decode_attr_out(p: bytes) -> dict[str, Any]:
    assert len(p) == 104
    av, avn, dummy = struct.unpack_from("<QII", p)
    assert dummy == 0
    return {"attr_valid": av, "attr_valid_nsec": avn, "attr": decode_attr(p, 16)}


def decode_init_out(p: bytes) -> dict[str, int]:
    names = ("major", "minor", "max_readahead", "flags", "max_background", "congestion_threshold",
             "max_write", "time_gran", "max_pages", "map_alignment", "flags2", "max_stack_depth",
             "request_timeout")
    fmt = {8: "<II", 24: "<IIIIHHI", 64: "<IIIIHHIIHHIIH22x"}[len(p)]
    return dict(zip(names, struct.unpack(fmt, p), strict=False))


def decode_dirents(p: bytes) -> list[tuple[int, int, int, bytes]]:
    """(ino, off, type, name) of each fuse_dirent, checking alignment and zero padding."""
    out, pos = [], 0
    while pos < len(p):
        ino, off, namelen, typ = struct.unpack_from("<QQII", p, pos)
        assert namelen > 0
        end = pos + 24 + namelen
        rec = align8(24 + namelen)
        assert pos + rec <= len(p), "entry split across the buffer end"
        assert p[end : pos + rec] == b"\0" * (pos + rec - end), "padding not zero"
        out.append((ino, off, typ, p[pos + 24 : end]))
        pos += rec
    assert pos == len(p)
    return out


def decode_direntplus(p: bytes) -> list[tuple[dict[str, Any], int, int, int, bytes]]:
    """(entry_out, ino, off, type, name) of each fuse_direntplus."""
    out, pos = [], 0
    while pos < len(p):
        entry = decode_entry_out(p[pos : pos + 128])
        ino, off, namelen, typ = struct.unpack_from("<QQII", p, pos + 128)
        assert namelen > 0
        end = pos + 152 + namelen
        rec = align8(152 + namelen)
        assert pos + rec <= len(p)
        assert p[end : pos + rec] == b"\0" * (pos + rec - end)
        out.append((entry, ino, off, typ, p[pos + 152 : end]))
        pos += rec
    assert pos == len(p)
    return out
