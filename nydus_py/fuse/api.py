"""The filesystem interface the FUSE request handler calls, with its result types.

A read-only filesystem implements `Filesystem` (model: fuse-backend-rs `FileSystem`). The handler
owns the wire format; the filesystem only deals in inode numbers (the kernel's nodeids: the
root is 1), names as bytes, and the small tuples below. Methods are plain synchronous calls:
the transport decides how many threads call them at once, so implementations must be
thread-safe once `init()` has returned.

Errors: raise `FuseError(errno)` (any `OSError` with a valid errno works too). Any other
exception becomes EIO in the reply and is logged with its traceback.
"""

import errno as _errno
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from functools import partial
from typing import NamedTuple, Protocol

from .abi import FOpenFlags, InitFlags
from .iovec import ReadDest, WouldBlock, scatter


class FuseError(OSError):
    """A filesystem method's failure, answered to the kernel as -errno."""

    def __init__(self, errno: int, message: str | None = None) -> None:
        super().__init__(errno, message or os.strerror(errno))


class FuseAttr(NamedTuple):
    """struct fuse_attr, fields in wire order (so the handler packs it with one call).

    `mode` includes the S_IFMT type bits; times are seconds (may be negative) + nanoseconds;
    `blocks` counts 512-byte units; `flags` is FUSE_ATTR_* (0 for nearly everything).
    """

    ino: int = 0
    size: int = 0
    blocks: int = 0
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    atime_nsec: int = 0
    mtime_nsec: int = 0
    ctime_nsec: int = 0
    mode: int = 0
    nlink: int = 0
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    blksize: int = 0
    flags: int = 0


ZERO_ATTR = FuseAttr()


class Entry(NamedTuple):
    """A LOOKUP result: the kernel caches the name for `entry_timeout` seconds and the
    attributes for `attr_timeout` seconds. `ino == 0` is a negative entry: the kernel caches
    "no such name" for `entry_timeout` (raise FuseError(ENOENT) instead to cache nothing)."""

    ino: int
    generation: int
    attr: FuseAttr
    entry_timeout: float
    attr_timeout: float


class StatFs(NamedTuple):
    """struct fuse_kstatfs, fields in wire order."""

    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    bsize: int = 4096
    namelen: int = 255
    frsize: int = 4096


class SetAttr(NamedTuple):
    """A SETATTR request: only the fields whose FATTR_* bit is in `valid` mean anything.
    `fh` is the open file's handle when FATTR_FH is set (ftruncate/futimens), else None.
    FATTR_ATIME_NOW / FATTR_MTIME_NOW mean "set to the current time"."""

    valid: int
    fh: int | None
    size: int
    atime: int
    atime_nsec: int
    mtime: int
    mtime_nsec: int
    mode: int
    uid: int
    gid: int


class Opened(NamedTuple):
    """An OPEN result that names a backing file: with FOPEN_PASSTHROUGH in `flags` the kernel
    reads and writes `backing_id` (registered with `BackingFiles.backing_open`) itself, and no
    READ of this open file ever reaches the filesystem. Plain opens return `(fh, flags)`."""

    fh: int
    flags: int
    backing_id: int = 0


OpenResult = tuple[int, int] | Opened


class BackingFiles(Protocol):
    """The transport's passthrough registry (FUSE_DEV_IOC_BACKING_OPEN/CLOSE on /dev/fuse)."""

    def backing_open(self, fd: int) -> int:
        """Register open file `fd` (the caller may close it afterwards); its backing id."""

    def backing_close(self, backing_id: int) -> None:
        """Drop a registration; passthrough opens already made keep their file."""


class Caller(NamedTuple):
    """Who asked (from fuse_in_header): new inodes should belong to uid/gid."""

    uid: int
    gid: int


# OPEN flags that change the file even with O_RDONLY access (the kernel itself sends O_TRUNC only
# with ATOMIC_O_TRUNC and never O_CREAT, but a virtio-fs guest may send anything): a read-only
# filesystem must never see them.
OPEN_MUTATING_FLAGS = os.O_TRUNC | os.O_CREAT | (os.O_TMPFILE & ~os.O_DIRECTORY)


def negative_entry(timeout: float) -> Entry:
    """An Entry telling the kernel to remember for `timeout` seconds that the name is absent."""
    return Entry(0, 0, ZERO_ATTR, timeout, 0.0)


# (name, ino, type, next_offset): `type` is the S_IFMT bits of the child's mode (as
# nydus_py.rafs.model.DirEntry carries them; the handler turns them into DT_*), `next_offset` the
# cookie a later readdir passes back as `offset` to continue *after* this entry (non-zero).
DirEntryTuple = tuple[bytes, int, int, int]
# (entry, name, type, next_offset): `entry.ino == 0` means "no lookup happened" (use it for "."
# and ".."); the dirent's d_ino is then taken from `entry.attr.ino`.
DirEntryPlusTuple = tuple[Entry, bytes, int, int]

DEFAULT_WANT = (
    InitFlags.ASYNC_READ
    | InitFlags.BIG_WRITES
    | InitFlags.PARALLEL_DIROPS
    | InitFlags.DO_READDIRPLUS
    | InitFlags.READDIRPLUS_AUTO
    | InitFlags.CACHE_SYMLINKS
    | InitFlags.EXPORT_SUPPORT
    | InitFlags.MAX_PAGES
)


class Filesystem(ABC):
    """What the FUSE handler needs from a read-only filesystem.

    Only lookup/getattr/readlink/read/readdir are abstract; the rest have defaults that suit a
    read-only image (and answer ENOSYS where that makes the kernel stop asking).
    """

    def init(self, capable: InitFlags) -> InitFlags:
        """Called on FUSE_INIT with the kernel's offered flags; return the flags wanted.

        The handler enables `capable & wanted & session.supported`. Opt into
        NO_OPEN_SUPPORT / NO_OPENDIR_SUPPORT here to make the kernel skip OPEN/OPENDIR
        (files then behave as FOPEN_KEEP_CACHE, directories as KEEP_CACHE|CACHE_DIR).
        With EXPORT_SUPPORT (default) `lookup` must answer b"." and b"..".
        """
        return DEFAULT_WANT

    def negotiated(self, flags: InitFlags) -> None:
        """What INIT enabled (after `init`; also when a successor restores a connection): e.g.
        whether OPEN may answer with passthrough (InitFlags.PASSTHROUGH)."""
        return None

    def destroy(self) -> None:
        """The connection is going away (FUSE_DESTROY, or a new INIT on the same session)."""
        return None

    @abstractmethod
    def lookup(self, parent: int, name: bytes) -> Entry:
        """Child `name` of directory `parent`; each success adds one to its lookup count."""

    def lookup_packed(self, parent: int, name: bytes, base: int = 0) -> bytes | None:
        """`lookup` already in wire form: the fuse_entry_out (abi.ENTRY_OUT) of the child, packed
        straight from the filesystem's own records with no Entry/FuseAttr tuples (a cold walk
        sends a LOOKUP per path component); errors raise as from `lookup`. `base` is OR'ed into
        the inode numbers (what a VFS mounting the filesystem below another does to them).
        None (this default): the handler builds the reply from `lookup`."""
        return None

    def forget(self, ino: int, nlookup: int) -> None:
        """The kernel dropped `nlookup` references to `ino` (never answered; errors are logged)."""
        return None

    def batch_forget(self, items: list[tuple[int, int]]) -> None:
        """Several forgets at once: (ino, nlookup) pairs."""
        for ino, nlookup in items:
            self.forget(ino, nlookup)

    @abstractmethod
    def getattr(self, ino: int) -> tuple[FuseAttr, float]:
        """Attributes of `ino` and how many seconds the kernel may cache them."""

    @abstractmethod
    def readlink(self, ino: int) -> bytes:
        """Target of symlink `ino` (EINVAL if it is not a symlink)."""

    def open(self, ino: int, flags: int) -> OpenResult:
        """Open regular file `ino`; return (fh, FOPEN_* flags), or `Opened` with a backing id
        and FOPEN_PASSTHROUGH when `negotiated` said PASSTHROUGH is on.

        Called only for O_RDONLY opens without OPEN_MUTATING_FLAGS unless the filesystem is
        `writable`: the handler answers EROFS for those itself.
        """
        return 0, FOpenFlags.KEEP_CACHE

    @abstractmethod
    def read(self, ino: int, fh: int, offset: int, size: int) -> bytes | bytearray | memoryview:
        """Up to `size` bytes at `offset`; fewer only at end of file (b"" past it)."""

    def read_waits(self, ino: int, offset: int = 0, size: int = 0) -> bool:
        """Whether a READ of [offset, +size) of `ino` may wait on something slower than a local
        disk (a registry fetch): a transport hands such READs to another thread first, so that
        other requests keep flowing; a READ that does not wait is answered by the thread that
        read it (no hand-off: no thread wake-ups and GIL passes per READ). `size` 0: any READ
        of `ino`. A cheap hint, asked before every READ; True unless the filesystem knows."""
        return True

    def warm(self, ino: int, size: int) -> None:  # noqa: B027 (optional, as read_waits)
        """Make the READ of all of regular file `ino` (`size` bytes) that will likely follow its
        LOOKUP cheap, if that costs no waiting (local data): called by a transport right after
        the LOOKUP reply, while the caller wakes up. Never raises; nothing by default."""

    def warm_next_dir(self, ino: int) -> None:  # noqa: B027 (optional, as warm)
        """Directory `ino` was listed to its end (the reply with its last entries, or its empty
        READDIR, answered): make the listing a walk of the tree asks for next cheap, if that
        costs no waiting. Called by a transport right after that reply. Never raises; nothing
        by default."""

    def read_into(self, ino: int, fh: int, offset: int, size: int, dest: ReadDest, nowait: bool = False) -> int:
        """Like `read`, but the data goes into `dest` (at most `dest.size` bytes; fewer only at
        end of file); returns how many bytes were written. A transport that owns the reply's
        memory (virtio-fs) saves the copies of a returned buffer. `nowait`: raise WouldBlock
        rather than wait for I/O (the caller retries on a thread that may wait). This default
        never answers without waiting, and copies `read`'s bytes once."""
        if nowait:
            raise WouldBlock
        data = self.read(ino, fh, offset, min(size, dest.size))
        return dest.fill(partial(scatter, data=data))

    def release(self, ino: int, fh: int) -> None:
        """Last close of an open file."""
        return None

    def flush(self, ino: int, fh: int) -> None:
        """close(2) of an open file. Defaults to ENOSYS, after which the kernel stops sending
        FLUSH altogether (one request fewer per file for a read-only filesystem)."""
        raise FuseError(_errno.ENOSYS)

    def opendir(self, ino: int, flags: int) -> tuple[int, int]:
        """Open directory `ino`; return (fh, FOPEN_* flags). CACHE_DIR lets the kernel keep
        readdir results in its page cache (a read-only tree never changes)."""
        return 0, FOpenFlags.KEEP_CACHE | FOpenFlags.CACHE_DIR

    @abstractmethod
    def readdir(self, ino: int, fh: int, offset: int) -> Iterable[DirEntryTuple]:
        """Entries of directory `ino` after cookie `offset` (0 = from the start, including
        "." and ".." if the filesystem lists them). Iterated lazily: the handler stops once the
        kernel's buffer is full, and a later call resumes from the last sent `next_offset`."""

    def readdirplus(self, ino: int, fh: int, offset: int) -> Iterable[DirEntryPlusTuple]:
        """READDIRPLUS: readdir plus a lookup of each entry (each sent Entry with a non-zero
        ino counts as one lookup). The default builds it from readdir() and lookup()."""
        for name, child, typ, off in self.readdir(ino, fh, offset):
            if name == b"." or name == b"..":
                yield Entry(0, 0, FuseAttr(ino=child, mode=typ), 0.0, 0.0), name, typ, off
            else:
                yield self.lookup(ino, name), name, typ, off

    def readdirplus_packed(self, ino: int, fh: int, offset: int, size: int, base: int = 0,
                           dotdot: int = 0) -> bytes | bytearray | memoryview | None:
        """READDIRPLUS already in wire form: the fuse_direntplus records (at most `size` bytes,
        the same entries and cookies `readdirplus` would give) that a filesystem packs straight
        from its own records, with no Entry/FuseAttr tuples per entry; b"" at the end of the
        listing. None (this default): the handler builds the reply from `readdirplus`. `base` is
        OR'ed into every inode number and, when non-zero, `dotdot` is the d_ino of ".." (what a
        VFS mounting the filesystem below another does to its numbers)."""
        return None

    def releasedir(self, ino: int, fh: int) -> None:
        """Last close of an open directory."""
        return None

    def statfs(self, ino: int) -> StatFs:
        """statfs(2) numbers for the filesystem that holds `ino`."""
        return StatFs()

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """Value of xattr `name` (ENODATA if absent). The default ENOSYS makes the kernel stop
        asking for any xattr, which `ls -l` on an image without xattrs profits from."""
        raise FuseError(_errno.ENOSYS)

    def listxattr(self, ino: int) -> list[bytes]:
        """Names of the xattrs of `ino` (without NULs). Default ENOSYS, as for getxattr."""
        raise FuseError(_errno.ENOSYS)

    def access(self, ino: int, mask: int, uid: int, gid: int) -> None:
        """access(2) check for the caller `uid`/`gid` (mask: R_OK|W_OK|X_OK, or F_OK = 0);
        raise EACCES to refuse. Not sent with default_permissions. Default ENOSYS: the kernel
        then allows everything and stops asking."""
        raise FuseError(_errno.ENOSYS)

    # -- writes -------------------------------------------------------------------------------
    # The handler answers EROFS for every mutating request (and for OPEN with write access)
    # unless the filesystem sets `writable = True`; the defaults below then answer ENOSYS.
    writable = False

    def setattr(self, ino: int, attr: SetAttr) -> tuple[FuseAttr, float]:
        """chmod/chown/truncate/utimens; the new attributes and their timeout."""
        raise FuseError(_errno.ENOSYS)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Entry:
        raise FuseError(_errno.ENOSYS)

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Entry:
        raise FuseError(_errno.ENOSYS)

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Entry:
        raise FuseError(_errno.ENOSYS)

    def link(self, ino: int, newparent: int, newname: bytes) -> Entry:
        raise FuseError(_errno.ENOSYS)

    def unlink(self, parent: int, name: bytes) -> None:
        raise FuseError(_errno.ENOSYS)

    def rmdir(self, parent: int, name: bytes) -> None:
        raise FuseError(_errno.ENOSYS)

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        """rename/renameat2 (flags: RENAME_NOREPLACE / EXCHANGE / WHITEOUT)."""
        raise FuseError(_errno.ENOSYS)

    def create(self, parent: int, name: bytes, mode: int, flags: int, caller: Caller) -> tuple[Entry, int, int]:
        """Create and open regular file `name`: (entry, fh, FOPEN_* flags). ENOSYS makes the
        kernel fall back to MKNOD + OPEN."""
        raise FuseError(_errno.ENOSYS)

    def write(self, ino: int, fh: int, offset: int, data: memoryview, flags: int) -> int:
        """Write `data` at `offset`; the number of bytes written."""
        raise FuseError(_errno.ENOSYS)

    def fsync(self, ino: int, fh: int, datasync: bool) -> None:
        """ENOSYS (the default) makes the kernel treat fsync as done and stop asking."""
        raise FuseError(_errno.ENOSYS)

    def fsyncdir(self, ino: int, fh: int, datasync: bool) -> None:
        raise FuseError(_errno.ENOSYS)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        raise FuseError(_errno.ENOSYS)

    def removexattr(self, ino: int, name: bytes) -> None:
        raise FuseError(_errno.ENOSYS)

    def fallocate(self, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        raise FuseError(_errno.ENOSYS)

    def lseek(self, ino: int, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE (the kernel handles the other whences itself). Default ENOSYS:
        the kernel falls back to treating the whole file as data."""
        raise FuseError(_errno.ENOSYS)
