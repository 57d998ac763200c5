"""The Linux FUSE kernel ABI (include/uapi/linux/fuse.h up to protocol 7.45) as Python constants.

Everything is little-endian and packed exactly like the C structs (they are all padded to 8 bytes
by design, so `<` formats without implicit padding match). Structs are precompiled
`struct.Struct` objects so the request handler never parses a format string on the hot path.
Variable-length records (dirents) are 8-byte aligned: see `dirent_size()`.
"""

import struct
from enum import IntEnum, IntFlag

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 45
# Oldest kernel minor we talk to: 7.13 made max_background/congestion_threshold part of init_out
# and every in-arg we decode has had its current size since 7.9.
MIN_KERNEL_MINOR_VERSION = 13
ROOT_ID = 1

MIN_READ_BUFFER = 8192
NAME_MAX = 1024  # FUSE_NAME_MAX: the kernel rejects dirent names longer than this

# init_out sizes the kernel expects from older minors
COMPAT_INIT_OUT_SIZE = 8  # minor < 5
COMPAT_22_INIT_OUT_SIZE = 24  # minor < 23
INIT_IN_COMPAT_SIZE = 16  # major, minor, max_readahead, flags (kernels before 7.36)


class Opcode(IntEnum):
    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36  # no reply
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41  # no reply (the kernel answering a RETRIEVE notification)
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53
    CUSE_INIT = 4096


# Opcodes the kernel never expects an answer to.
NO_REPLY_OPCODES = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT, Opcode.NOTIFY_REPLY})


class NotifyCode(IntEnum):
    """Unsolicited server -> kernel messages: out_header.unique = 0, error = the code."""

    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7
    INC_EPOCH = 8
    PRUNE = 9


class InitFlags(IntFlag):
    """fuse_init_in/out flags; bits 32..63 travel in flags2 (only with INIT_EXT, minor >= 36)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41
    REQUEST_TIMEOUT = 1 << 42


class FOpenFlags(IntFlag):
    """fuse_open_out.open_flags: how the kernel may cache an open file or directory."""

    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6
    PASSTHROUGH = 1 << 7


# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

RELEASE_FLUSH = 1 << 0
RELEASE_FLOCK_UNLOCK = 1 << 1
GETATTR_FH = 1 << 0
LK_FLOCK = 1 << 0
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
READ_LOCKOWNER = 1 << 1
IOCTL_COMPAT = 1 << 0
IOCTL_UNRESTRICTED = 1 << 1
IOCTL_RETRY = 1 << 2
IOCTL_32BIT = 1 << 3
IOCTL_DIR = 1 << 4
IOCTL_COMPAT_X32 = 1 << 5
POLL_SCHEDULE_NOTIFY = 1 << 0
FSYNC_FDATASYNC = 1 << 0
ATTR_SUBMOUNT = 1 << 0
ATTR_DAX = 1 << 1
OPEN_KILL_SUIDGID = 1 << 0
SETXATTR_ACL_KILL_SGID = 1 << 0
EXPIRE_ONLY = 1 << 0

FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
# Passthrough (7.40): register an open file as the backing of passthrough opens; the ioctl
# returns its backing id (> 0), which OPEN replies name in fuse_open_out.backing_id.
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)
BACKING_MAP = struct.Struct("<iIQ")  # fd, flags (must be 0), padding (must be 0)
BACKING_ID = struct.Struct("<I")
# The kernel's FILESYSTEM_MAX_STACK_DEPTH: a passthrough FUSE mount announces its own depth
# (init_out.max_stack_depth, 1..2); a filesystem stacked on its files adds one more level.
FILESYSTEM_MAX_STACK_DEPTH = 2

# --- headers ---------------------------------------------------------------------------------
# len, opcode, unique, nodeid, uid, gid, pid, total_extlen (u16, in 8-byte units, 7.38), padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
# len, error (negative errno), unique
OUT_HEADER = struct.Struct("<IiQ")

# --- attributes and entries ------------------------------------------------------------------
# ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
# mode, nlink, uid, gid, rdev, blksize, flags. The header says u64 for the times but the kernel
# stores them in a time64_t, so they are packed signed: pre-1970 times survive.
ATTR_FMT = "QQQqqqIIIIIIIIII"
ATTR = struct.Struct("<" + ATTR_FMT)
# nodeid, generation, entry_valid, attr_valid, entry_valid_nsec, attr_valid_nsec, attr
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR_FMT)
# attr_valid, attr_valid_nsec, dummy, attr
ATTR_OUT = struct.Struct("<QII" + ATTR_FMT)
# getattr_flags, dummy, fh
GETATTR_IN = struct.Struct("<IIQ")

# --- statx (7.39) ----------------------------------------------------------------------------
SX_TIME = struct.Struct("<qIi")  # tv_sec, tv_nsec, reserved
# mask, blksize, attributes, nlink, uid, gid, mode(u16), spare0(u16), ino, size, blocks,
# attributes_mask, atime, btime, ctime, mtime (each qIi), rdev_major, rdev_minor, dev_major,
# dev_minor, spare2[14]
STATX = struct.Struct("<IIQIIIHHQQQQ" + "qIi" * 4 + "IIII112x")
# getattr_flags, reserved, fh, sx_flags, sx_mask
STATX_IN = struct.Struct("<IIQII")
# attr_valid, attr_valid_nsec, flags, spare[2], then a STATX
STATX_OUT_HEAD = struct.Struct("<QII16x")

# --- open / read / release -------------------------------------------------------------------
OPEN_IN = struct.Struct("<II")  # flags (open(2) flags), open_flags (FUSE_OPEN_*)
# fh, open_flags, backing_id (7.40; was padding)
OPEN_OUT = struct.Struct("<QIi")
# fh, offset, size, read_flags, lock_owner, flags, padding
READ_IN = struct.Struct("<QQIIQII")
# fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_IN = struct.Struct("<QQIIQII")
WRITE_OUT = struct.Struct("<II")  # size, padding
# fh, flags, release_flags, lock_owner
RELEASE_IN = struct.Struct("<QIIQ")
# fh, unused, padding, lock_owner
FLUSH_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")  # fh, fsync_flags, padding

# --- xattr / access / statfs -----------------------------------------------------------------
GETXATTR_IN = struct.Struct("<II")  # size, padding; the name follows NUL-terminated
GETXATTR_OUT = struct.Struct("<II")  # size, padding
SETXATTR_IN = struct.Struct("<IIII")  # size, flags, setxattr_flags, padding (SETXATTR_EXT)
SETXATTR_IN_COMPAT = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")  # mask, padding
# blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, then padding + spare[6]
KSTATFS = struct.Struct("<QQQQQIII28x")

# --- init ------------------------------------------------------------------------------------
INIT_IN = struct.Struct("<IIIII44x")  # major, minor, max_readahead, flags, flags2, unused[11]
INIT_IN_COMPAT = struct.Struct("<IIII")
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write,
# time_gran, max_pages, map_alignment, flags2, max_stack_depth, request_timeout, unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")

# --- misc ops --------------------------------------------------------------------------------
INTERRUPT_IN = struct.Struct("<Q")  # unique of the interrupted request
FORGET_IN = struct.Struct("<Q")  # nlookup
FORGET_ONE = struct.Struct("<QQ")  # nodeid, nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count, dummy
LSEEK_IN = struct.Struct("<QQII")  # fh, offset, whence, padding
LSEEK_OUT = struct.Struct("<Q")
# fh, kh, flags, events
POLL_IN = struct.Struct("<QQII")
POLL_OUT = struct.Struct("<II")  # revents, padding
# fh, flags, cmd, arg, in_size, out_size
IOCTL_IN = struct.Struct("<QIIQII")
IOCTL_OUT = struct.Struct("<iIII")  # result, flags, in_iovs, out_iovs
BMAP_IN = struct.Struct("<QII")  # block, blocksize, padding
BMAP_OUT = struct.Struct("<Q")
# fh, owner, lk(start, end, type, pid), lk_flags, padding
LK_IN = struct.Struct("<QQQQIIII")
LK_OUT = struct.Struct("<QQII")
FALLOCATE_IN = struct.Struct("<QQQII")  # fh, offset, length, mode, padding
# fh_in, off_in, nodeid_out, fh_out, off_out, len, flags
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")
COPY_FILE_RANGE_OUT = struct.Struct("<Q")  # bytes_copied (7.45, COPY_FILE_RANGE_64)
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")  # mode, rdev, umask, padding; the name follows
MKDIR_IN = struct.Struct("<II")  # mode, umask; the name follows
RENAME_IN = struct.Struct("<Q")  # newdir; old and new names follow
RENAME2_IN = struct.Struct("<QII")  # newdir, flags, padding; old and new names follow
LINK_IN = struct.Struct("<Q")  # oldnodeid; the new name follows
CREATE_IN = struct.Struct("<IIII")  # flags, mode, umask, open_flags; the name follows
SYNCFS_IN = struct.Struct("<Q")
# fh, foffset, len, flags, moffset
SETUPMAPPING_IN = struct.Struct("<QQQQQ")
REMOVEMAPPING_IN = struct.Struct("<I")

# --- directory records -----------------------------------------------------------------------
# ino, off (cookie of the *next* entry), namelen, type (DT_*); the name follows, then zero
# padding up to a multiple of 8
DIRENT = struct.Struct("<QQII")
# entry_out followed by a dirent
DIRENTPLUS = struct.Struct("<QQQQII" + ATTR_FMT + "QQII")

# --- notifications (server -> kernel) --------------------------------------------------------
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino, off, len
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")  # parent, namelen, flags; name + NUL follow
NOTIFY_DELETE_OUT = struct.Struct("<QQII")  # parent, child, namelen, padding; name + NUL follow


def dirent_size(namelen: int) -> int:
    """FUSE_DIRENT_SIZE: a fuse_dirent with a `namelen`-byte name, rounded up to 8 bytes."""
    return (DIRENT.size + namelen + 7) & ~7


def direntplus_size(namelen: int) -> int:
    """FUSE_DIRENTPLUS_SIZE: entry_out + dirent + name, rounded up to 8 bytes."""
    return (DIRENTPLUS.size + namelen + 7) & ~7


def init_out_size(kernel_minor: int) -> int:
    """How many init_out bytes a kernel speaking `kernel_minor` reads."""
    if kernel_minor < 5:
        return COMPAT_INIT_OUT_SIZE
    if kernel_minor < 23:
        return COMPAT_22_INIT_OUT_SIZE
    return INIT_OUT.size


# In-args of each request, for decoding (debug logs, tests): (struct, field names, number of
# NUL-terminated strings after the struct). Data payloads (WRITE) and extensions are not listed.
REQUEST_ARGS: dict[int, tuple[struct.Struct | None, tuple[str, ...], int]] = {
    Opcode.LOOKUP: (None, (), 1),
    Opcode.FORGET: (FORGET_IN, ("nlookup",), 0),
    Opcode.GETATTR: (GETATTR_IN, ("getattr_flags", "dummy", "fh"), 0),
    Opcode.SETATTR: (
        SETATTR_IN,
        ("valid", "padding", "fh", "size", "lock_owner", "atime", "mtime", "ctime", "atimensec",
         "mtimensec", "ctimensec", "mode", "unused4", "uid", "gid", "unused5"),
        0,
    ),
    Opcode.READLINK: (None, (), 0),
    Opcode.SYMLINK: (None, (), 2),
    Opcode.MKNOD: (MKNOD_IN, ("mode", "rdev", "umask", "padding"), 1),
    Opcode.MKDIR: (MKDIR_IN, ("mode", "umask"), 1),
    Opcode.UNLINK: (None, (), 1),
    Opcode.RMDIR: (None, (), 1),
    Opcode.RENAME: (RENAME_IN, ("newdir",), 2),
    Opcode.LINK: (LINK_IN, ("oldnodeid",), 1),
    Opcode.OPEN: (OPEN_IN, ("flags", "open_flags"), 0),
    Opcode.READ: (READ_IN, ("fh", "offset", "size", "read_flags", "lock_owner", "flags", "padding"), 0),
    Opcode.WRITE: (WRITE_IN, ("fh", "offset", "size", "write_flags", "lock_owner", "flags", "padding"), 0),
    Opcode.STATFS: (None, (), 0),
    Opcode.RELEASE: (RELEASE_IN, ("fh", "flags", "release_flags", "lock_owner"), 0),
    Opcode.FSYNC: (FSYNC_IN, ("fh", "fsync_flags", "padding"), 0),
    Opcode.SETXATTR: (SETXATTR_IN_COMPAT, ("size", "flags"), 1),
    Opcode.GETXATTR: (GETXATTR_IN, ("size", "padding"), 1),
    Opcode.LISTXATTR: (GETXATTR_IN, ("size", "padding"), 0),
    Opcode.REMOVEXATTR: (None, (), 1),
    Opcode.FLUSH: (FLUSH_IN, ("fh", "unused", "padding", "lock_owner"), 0),
    Opcode.INIT: (INIT_IN_COMPAT, ("major", "minor", "max_readahead", "flags"), 0),
    Opcode.OPENDIR: (OPEN_IN, ("flags", "open_flags"), 0),
    Opcode.READDIR: (READ_IN, ("fh", "offset", "size", "read_flags", "lock_owner", "flags", "padding"), 0),
    Opcode.RELEASEDIR: (RELEASE_IN, ("fh", "flags", "release_flags", "lock_owner"), 0),
    Opcode.FSYNCDIR: (FSYNC_IN, ("fh", "fsync_flags", "padding"), 0),
    Opcode.GETLK: (LK_IN, ("fh", "owner", "start", "end", "type", "pid", "lk_flags", "padding"), 0),
    Opcode.SETLK: (LK_IN, ("fh", "owner", "start", "end", "type", "pid", "lk_flags", "padding"), 0),
    Opcode.SETLKW: (LK_IN, ("fh", "owner", "start", "end", "type", "pid", "lk_flags", "padding"), 0),
    Opcode.ACCESS: (ACCESS_IN, ("mask", "padding"), 0),
    Opcode.CREATE: (CREATE_IN, ("flags", "mode", "umask", "open_flags"), 1),
    Opcode.INTERRUPT: (INTERRUPT_IN, ("unique",), 0),
    Opcode.BMAP: (BMAP_IN, ("block", "blocksize", "padding"), 0),
    Opcode.DESTROY: (None, (), 0),
    Opcode.IOCTL: (IOCTL_IN, ("fh", "flags", "cmd", "arg", "in_size", "out_size"), 0),
    Opcode.POLL: (POLL_IN, ("fh", "kh", "flags", "events"), 0),
    Opcode.BATCH_FORGET: (BATCH_FORGET_IN, ("count", "dummy"), 0),
    Opcode.FALLOCATE: (FALLOCATE_IN, ("fh", "offset", "length", "mode", "padding"), 0),
    Opcode.READDIRPLUS: (
        READ_IN, ("fh", "offset", "size", "read_flags", "lock_owner", "flags", "padding"), 0),
    Opcode.RENAME2: (RENAME2_IN, ("newdir", "flags", "padding"), 2),
    Opcode.LSEEK: (LSEEK_IN, ("fh", "offset", "whence", "padding"), 0),
    Opcode.COPY_FILE_RANGE: (
        COPY_FILE_RANGE_IN, ("fh_in", "off_in", "nodeid_out", "fh_out", "off_out", "len", "flags"), 0),
    Opcode.COPY_FILE_RANGE_64: (
        COPY_FILE_RANGE_IN, ("fh_in", "off_in", "nodeid_out", "fh_out", "off_out", "len", "flags"), 0),
    Opcode.SETUPMAPPING: (SETUPMAPPING_IN, ("fh", "foffset", "len", "flags", "moffset"), 0),
    Opcode.REMOVEMAPPING: (REMOVEMAPPING_IN, ("count",), 0),
    Opcode.SYNCFS: (SYNCFS_IN, ("padding",), 0),
    Opcode.TMPFILE: (CREATE_IN, ("flags", "mode", "umask", "open_flags"), 1),
    Opcode.STATX: (STATX_IN, ("getattr_flags", "reserved", "fh", "sx_flags", "sx_mask"), 0),
}
