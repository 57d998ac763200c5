"""A read-write passthrough of a host directory (Kata's shared `/containers`), confined to it.

Every inode the guest knows is an O_PATH fd; every name is checked to be exactly one path
component (no "/", not "." or "..", not empty, no NUL) at this class's own API — not only by the
FUSE decoder in front of it — and is resolved from its parent's fd with openat2(RESOLVE_BENEATH |
RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS) or acted on with an *at() call, so neither ".." nor
a symlink — planted by the guest or swapped in on the host — ever leads out of the shared
directory. Rules that keep it that way:
* ".." is only answered for the root (as itself); EXPORT_SUPPORT is not offered, so the kernel
  never needs more.
* Nothing follows a symlink inode: opening one is ELOOP, mode/time changes on one are refused,
  chown/link use AT_EMPTY_PATH on the fd itself, xattrs on symlinks are refused.
* Data ops reopen the O_PATH fd through /proc/self/fd (the inode itself, not a path), only for
  regular files and directories; device nodes can be neither created nor opened.
* A create that fails half-way removes the name it made (if the name still is what it made).
* `writable=False` refuses every mutation, including opens with O_TRUNC, O_CREAT or O_APPEND.
New inodes are chowned to the caller's uid/gid when we run as root (virtiofsd does the same with
per-thread fsuid). Entry/attr timeouts are short (the host may change the tree: cache=auto).

Every request holds the inode or handle it works on (`with self._using(ino) as node:`), so a
FORGET, RELEASE or RELEASEDIR racing it (a hostile guest; the kernel never does that) only drops
the table entry: the fds stay open until the last request using them ends, and are never closed
under a syscall whose fd number would by then name another file of the daemon.

A READ with handle 0 means the kernel opened without asking us (a VFS that negotiated
zero-message open, as `nydusd-py fuse` does for its RAFS mounts): it is served from one read-only
fd per inode, opened on first use and closed with the inode. Our own handles start at 1.
"""

import abc
import ctypes
import errno
import logging
import mmap
import os
import stat
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Self

from ..fuse.abi import (
    DIRENTPLUS,
    FATTR_ATIME,
    FATTR_ATIME_NOW,
    FATTR_GID,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_MTIME_NOW,
    FATTR_SIZE,
    FATTR_UID,
    FOpenFlags,
    InitFlags,
)
from ..fuse.api import (
    DEFAULT_WANT,
    Caller,
    DirEntryPlusTuple,
    DirEntryTuple,
    Entry,
    Filesystem,
    FuseAttr,
    FuseError,
    SetAttr,
    StatFs,
)
from ..fuse.api import OPEN_MUTATING_FLAGS as _OPEN_MUTATING
from ..fuse.iovec import ReadDest, WouldBlock, trim
from ..fuse.protocol import split_timeout
from .casefold import CaseFolder

log = logging.getLogger(__name__)

ROOT_ID = 1
NAME_MAX = 255
AT_EMPTY_PATH = 0x1000
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS
SYS_OPENAT2 = 437  # one number on every architecture (x86_64, aarch64, ...) since 5.6
RENAME_FLAGS = 1 | 2 | 4  # RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT
# A read-only share also refuses O_APPEND (issue 16): nothing but plain reads reaches the host.
_READ_ONLY_REFUSED = os.O_ACCMODE | _OPEN_MUTATING | os.O_APPEND
_libc = ctypes.CDLL(None, use_errno=True)

# Every fallback this module takes, by kind (each also logged): "openat2_enosys" counts name
# resolutions done with openat(O_NOFOLLOW) because the kernel has no openat2.
FALLBACKS: Counter[str] = Counter()


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_have_openat2 = True
_NS = 1_000_000_000
_new_attr = tuple.__new__
# the open_how of each flags value without O_CREAT (a lookup's O_PATH|O_NOFOLLOW, a reopen's)
_HOWS: dict[int, _OpenHow] = {}
_LISTED_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_NOFLUSH = int(FOpenFlags.NOFLUSH)
_S_IFMT = 0o170000
_DP_SIZE = DIRENTPLUS.size  # fuse_entry_out + fuse_dirent, before the name
_DP_PACK_INTO = DIRENTPLUS.pack_into


def _sys_openat2(dirfd: int, name: bytes, how: _OpenHow) -> int:
    """The raw openat2(2) syscall: an fd, or -errno."""
    fd = _libc.syscall(SYS_OPENAT2, dirfd, name, ctypes.byref(how), ctypes.sizeof(how))
    return int(fd) if fd >= 0 else -ctypes.get_errno()


def component(name: bytes) -> bytes:
    """`name` if it is exactly one path component; FuseError otherwise (EINVAL, or
    ENAMETOOLONG). Checked here and not only by the FUSE decoder: any caller of the API gets
    the same confinement."""
    if (not isinstance(name, bytes) or not name or name in (b".", b"..") or b"/" in name
            or b"\0" in name):
        raise FuseError(errno.EINVAL, f"not a single path component: {name!r}")
    if len(name) > NAME_MAX:
        raise FuseError(errno.ENAMETOOLONG)
    return name


def openat_beneath(dirfd: int, name: bytes, flags: int, mode: int = 0) -> int:
    """openat2(dirfd, name, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS)
    of one path component. Only on ENOSYS (a kernel older than 5.6) does it fall back to
    openat(O_NOFOLLOW), which can't escape either for a single component; that is logged and
    counted in FALLBACKS."""
    global _have_openat2
    component(name)
    if _have_openat2:
        how = _HOWS.get(flags) if not flags & os.O_CREAT else None
        if how is None:
            how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, RESOLVE)
            if not flags & os.O_CREAT and len(_HOWS) < 64:
                _HOWS[flags] = how  # (never changed once made: shared by every thread)
        fd = _sys_openat2(dirfd, name, how)
        if fd >= 0:
            return fd
        if fd != -errno.ENOSYS:
            raise OSError(-fd, os.strerror(-fd), name)
        _have_openat2 = False
        log.error("passthrough: openat2 is not available (ENOSYS): resolving single names with "
                  "openat(O_NOFOLLOW) instead of RESOLVE_BENEATH")
    FALLBACKS["openat2_enosys"] += 1
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _fchown_empty(fd: int, uid: int, gid: int) -> None:
    _check(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH), "fchownat")


def _link_empty(fd: int, newdir: int, name: bytes) -> None:
    _check(_libc.linkat(fd, b"", newdir, name, AT_EMPTY_PATH), "linkat")


def _renameat2(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddir, old, newdir, new, ctypes.c_uint(flags)), "renameat2")


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_PAGE_MASK = mmap.PAGESIZE - 1


def _preadv_full(fd: int, offset: int, size: int, bufs: list[memoryview]) -> int:
    """preadv until `size` bytes or the end of the file (in IOV_MAX pieces); the bytes read."""
    got = 0
    while got < size:
        part = bufs[:_IOV_MAX]
        n = os.preadv(fd, part, offset + got)
        if n <= 0:
            break
        got += n
        bufs = trim(bufs, n, size - got)
    return got


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


# the live /proc/self/fd fds of filesystems: a forked child opens its own (the parent's would
# name the parent's fds)
_PROC_DIRS: "weakref.WeakSet[_ProcDir]" = weakref.WeakSet()


def _reopen_proc_dirs_in_child() -> None:
    for p in list(_PROC_DIRS):
        if p.fd >= 0:
            new = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            os.dup2(new, p.fd, inheritable=False)  # (the same number: no gap for a request)
            os.close(new)


os.register_at_fork(after_in_child=_reopen_proc_dirs_in_child)


class _Held(abc.ABC):
    """An owner of fds (an inode or an open handle) that requests borrow: the context manager a
    `with self._using*(...)` block runs on.

    Taken under the filesystem lock (found in its table, one token appended to `users`); given
    back in `__exit__` without it: list.append/pop are atomic, and the GIL orders every step, so
    of a last user popping its token and then reading `dead`, and a forget/release setting `dead`
    (under the lock, as it drops the table entry, so nobody takes it after) and then reading
    `users`, at least one sees the other and closes. Exactly one does: closing pops the single
    `_unclosed` token first. One lock round trip per request, none on the way out."""

    __slots__ = ("users", "dead", "_unclosed")

    def __init__(self) -> None:
        self.users: list[None] = []
        self.dead = False
        self._unclosed: list[None] = [None]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.users.pop()
        if self.dead:
            self.close_if_unused()

    def close_if_unused(self) -> None:
        """Close the fds if the tables dropped this and no request uses it any more."""
        if self.users:
            return
        try:
            self._unclosed.pop()
        except IndexError:
            return  # closed already (the other side got there first)
        self._close_fds()

    @property
    @abc.abstractmethod
    def io_fd(self) -> int:
        """The fd that data ops (read, fsync, lseek) use."""

    @abc.abstractmethod
    def _close_fds(self) -> None:
        """Close what this owns (once: `close_if_unused` makes sure)."""


class _Inode(_Held):
    __slots__ = ("ino", "fd", "key", "mode", "nlookup", "rfd")

    def __init__(self, ino: int, fd: int, key: tuple[int, int], mode: int, nlookup: int = 0) -> None:
        # (_Held.__init__ inline: a READDIRPLUS makes one per entry)
        self.users: list[None] = []
        self.dead = False
        self._unclosed: list[None] = [None]
        self.ino = ino
        self.fd = fd  # O_PATH (| O_NOFOLLOW for symlinks)
        self.key = key  # (st_dev, st_ino) on the host
        self.mode = mode  # S_IFMT bits, fixed for the inode's life
        self.nlookup = nlookup
        self.rfd = -1  # read-only fd for reads without an OPEN (handle 0), opened on first use

    @property
    def io_fd(self) -> int:
        return self.rfd

    def _close_fds(self) -> None:
        for fd in (self.rfd, self.fd):
            if fd >= 0:
                try:  # noqa: SIM105 (not contextlib.suppress: an object per close, on every FORGET)
                    os.close(fd)
                except OSError:
                    pass
        self.rfd = self.fd = -1


class _OneFd(_Held):
    """An owner of exactly one fd, which data ops use too."""

    __slots__ = ("fd",)
    fd: int

    @property
    def io_fd(self) -> int:
        return self.fd

    def _close_fds(self) -> None:
        try:  # noqa: SIM105 (not contextlib.suppress: an object per close, on every RELEASE)
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1


class _Handle(_OneFd):
    __slots__ = ("is_dir", "entries", "writes")

    def __init__(self, fd: int, is_dir: bool, writes: bool = True) -> None:
        # (_Held.__init__, inline: one handle per OPEN)
        self.users = []
        self.dead = False
        self._unclosed = [None]
        self.fd = fd
        self.is_dir = is_dir
        self.writes = writes  # opened for writing: FLUSH has host work to do (see flush)
        self.entries: list[tuple[bytes, int, int]] | None = None  # dirs: (name, host ino, S_IFMT type)


class _ProcDir(_OneFd):
    """An O_PATH fd of /proc/self/fd: `reopen` resolves one name from it instead of walking
    /proc/self/fd/N (as virtiofsd does). Held per call, so `close` never pulls it from under
    a reopen in flight (whose fd number could otherwise be reused meanwhile)."""

    __slots__ = ("__weakref__",)

    def __init__(self) -> None:
        super().__init__()
        self.fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        _PROC_DIRS.add(self)

    def reopen(self, fd: int, flags: int) -> int:
        """open(/proc/self/fd/`fd`, flags | O_CLOEXEC)."""
        self.users.append(None)
        try:
            if self.dead:
                raise FuseError(errno.ESTALE)
            return os.open(str(fd), flags | os.O_CLOEXEC, dir_fd=self.fd)
        finally:
            self.__exit__(None, None, None)


class PassthroughFilesystem(Filesystem):
    """`root` (a host directory) served read-write, or read-only with `writable=False`."""

    def __init__(self, root: str, *, writable: bool = True, entry_timeout: float = 1.0,
                 attr_timeout: float = 1.0, xattr: bool = True, case_insensitive: bool = False) -> None:
        """`case_insensitive`: a LOOKUP that misses falls back to a case-folded match (fs.casefold;
        a directory's index is rebuilt when its mtime or ctime changes)."""
        self.root_path = os.path.realpath(root)
        self.casefold = CaseFolder(f"passthrough {self.root_path}") if case_insensitive else None
        self.writable = writable
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.xattr = xattr
        self._chown = os.geteuid() == 0
        self._lock = threading.Lock()
        self._inodes: dict[int, _Inode] = {}
        self._by_key: dict[tuple[int, int], int] = {}
        self._next_ino = ROOT_ID + 1
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        # read_into(nowait=True) uses preadv2(RWF_NOWAIT); off for good after the host's
        # filesystem refused it once (logged; such reads then all go to the caller's pool)
        self.nowait_supported = True
        self.nowait_refused = 0
        self._proc = _ProcDir()  # (closed by close())
        fd = os.open(self.root_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        self._root = _Inode(ROOT_ID, fd, (st.st_dev, st.st_ino), stat.S_IFDIR, 1)
        self._inodes[ROOT_ID] = self._root
        self._by_key[self._root.key] = ROOT_ID

    # -- lifecycle ---------------------------------------------------------------------------
    def init(self, capable: InitFlags) -> InitFlags:
        # no EXPORT_SUPPORT: the kernel then never looks up "." or ".."
        return (DEFAULT_WANT & ~InitFlags.EXPORT_SUPPORT) | InitFlags.AUTO_INVAL_DATA | InitFlags.ASYNC_DIO

    def destroy(self) -> None:
        """The guest went away: drop every inode and handle but the root (requests still
        running close theirs when they end)."""
        if self.casefold is not None:
            self.casefold.clear()  # (its indexes are keyed by inode numbers of this session)
        with self._lock:
            dropped: list[_Held] = [n for n in self._inodes.values() if n is not self._root]
            dropped += self._handles.values()
            for held in dropped:
                held.dead = True
            alive = not self._root.dead  # (after close() the root stays gone)
            self._inodes = {ROOT_ID: self._root} if alive else {}
            self._by_key = {self._root.key: ROOT_ID} if alive else {}
            self._handles = {}
        for held in dropped:
            held.close_if_unused()

    def close(self) -> None:
        """Drop everything, the root too: later requests get ESTALE."""
        self.destroy()
        with self._lock:
            self._inodes = {}
            self._by_key = {}
            self._root.dead = True
            self._proc.dead = True
        self._root.close_if_unused()
        self._proc.close_if_unused()

    # -- holding inodes and handles ----------------------------------------------------------
    def _using(self, ino: int, *, dir_only: bool = False) -> _Inode:
        """Inode `ino`, its fds kept open until the request is done with it:
        `with self._using(ino) as node:` (ESTALE if unknown, ENOTDIR for `dir_only`)."""
        with self._lock:
            node = self._inodes.get(ino)
            if node is None:
                raise FuseError(errno.ESTALE)
            if dir_only and not stat.S_ISDIR(node.mode):
                raise FuseError(errno.ENOTDIR)
            node.users.append(None)
        return node

    def _using_handle(self, fh: int) -> _Handle:
        """Handle `fh`, its fd kept open until the request is done with it (EBADF if unknown)."""
        with self._lock:
            h = self._handles.get(fh)
            if h is None:
                raise FuseError(errno.EBADF)
            h.users.append(None)
        return h

    def _using_io(self, ino: int, fh: int) -> _Held:
        """What to read `ino` through, held (its `io_fd`): handle `fh`, or for handle 0 (the
        kernel skipped OPEN: zero-message open) the inode with its own read-only fd, opened
        once. One lock round trip once that fd exists."""
        if fh:
            return self._using_handle(fh)
        with self._lock:
            node = self._inodes.get(ino)
            if node is None:
                raise FuseError(errno.ESTALE)
            if not stat.S_ISREG(node.mode):
                raise FuseError(errno.EISDIR if stat.S_ISDIR(node.mode) else errno.EBADF)
            node.users.append(None)
            if node.rfd >= 0:
                return node
        try:
            fd = self._reopen(node, os.O_RDONLY)
            with self._lock:
                if node.rfd < 0:  # (installed even if forgotten meanwhile: its closer closes it)
                    node.rfd = fd
                    return node
            os.close(fd)  # another request was first
            return node
        except BaseException:
            node.__exit__(None, None, None)
            raise

    def _parent(self, parent: int, name: bytes) -> _Inode:
        """The directory a mutation happens in, held, after the read-only and name checks:
        `with self._parent(parent, name) as p:`."""
        self._check_writable()
        component(name)
        return self._using(parent, dir_only=True)

    # -- inodes ------------------------------------------------------------------------------
    def _attr(self, st: os.stat_result) -> FuseAttr:
        # positional, from the stat tuple (its whole seconds are floored, as the nanoseconds
        # part expects): a READDIRPLUS builds one per entry
        return _new_attr(FuseAttr, (
            st[1], st[6], st.st_blocks, st[7], st[8], st[9], st.st_atime_ns % _NS, st.st_mtime_ns % _NS,
            st.st_ctime_ns % _NS, st[0], st[3], st[4], st[5], st.st_rdev, st.st_blksize, 0))

    def _register(self, fd: int) -> Entry:
        """Turn a fresh O_PATH fd (ours: no request shares it) into a looked-up inode (reusing
        the known one for the same host inode: hard links and repeated lookups share a nodeid)."""
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        ino = self._register_many([(0, b"", 0, fd, st)])[0]
        return Entry(ino, 0, self._attr(st), self.entry_timeout, self.attr_timeout)

    @staticmethod
    def _open_child(parent: _Inode, name: bytes) -> int:
        """An O_PATH fd of `name` (one component, checked: never "." or "..") in `parent`, the
        link itself for a symlink: openat(O_NOFOLLOW) resolves no path and follows no link, so
        it is as confined as openat2's RESOLVE_BENEATH (see `_open_listed`), at half the cost
        of the ctypes call on every LOOKUP."""
        return os.open(component(name), _LISTED_FLAGS, dir_fd=parent.fd)

    @staticmethod
    def _open_listed(parent: _Inode, name: bytes) -> int:
        """An O_PATH fd of `name` as the directory's own listing gave it (getdents: one
        component, never "." or ".." here). openat(O_NOFOLLOW) of one component resolves no
        path and follows no link, so it is as confined as openat2's RESOLVE_BENEATH, at a
        third of the cost of the ctypes call (a READDIRPLUS opens one per entry)."""
        return os.open(name, _LISTED_FLAGS, dir_fd=parent.fd)

    def lookup(self, parent: int, name: bytes) -> Entry:
        with self._using(parent, dir_only=True) as p:
            if name == b"." or (name == b".." and parent == ROOT_ID):
                fd = os.dup(p.fd)
            elif name == b"..":
                raise FuseError(errno.EACCES)
            else:
                try:
                    fd = self._open_child(p, name)
                except FileNotFoundError:
                    real = self._casefold(p, name)
                    if real is None:
                        raise
                    fd = self._open_child(p, real)
        return self._register(fd)

    def _casefold(self, p: "_Inode", name: bytes) -> bytes | None:
        """The name in directory `p` (held) that `name` matches ignoring case, or None."""
        if self.casefold is None:
            return None
        st = os.fstat(p.fd)
        return self.casefold.resolve(p.ino, name, lambda: map(os.fsencode, os.listdir(_proc(p.fd))),
                                     (st.st_ino, st.st_mtime_ns, st.st_ctime_ns))

    def readdirplus(self, ino: int, fh: int, offset: int) -> Iterator[DirEntryPlusTuple]:
        """readdir plus the lookup of each entry, as the default does, with the directory held
        once for the whole reply instead of once per entry. An entry removed since the listing
        was taken is left out (its lookup would fail the whole reply, and with it the lookups
        of the entries before it)."""
        with self._using(ino, dir_only=True) as p:
            for name, child, typ, off in self.readdir(ino, fh, offset):
                if name == b"." or name == b"..":
                    yield Entry(0, 0, FuseAttr(ino=child, mode=typ), 0.0, 0.0), name, typ, off
                    continue
                try:
                    fd = self._open_listed(p, name)
                except FileNotFoundError:
                    log.debug("readdirplus(%d): %r was removed since the listing; left out", ino, name)
                    continue
                yield self._register(fd), name, typ, off

    def readdirplus_packed(self, ino: int, fh: int, offset: int, size: int, base: int = 0,
                           dotdot: int = 0) -> bytearray:
        """`readdirplus` packed into one buffer, byte for byte what the session builds from its
        tuples (`base` and `dotdot` as the Vfs moves them), without Entry/FuseAttr objects or a
        generator hop per entry, and only the entries that fit are opened: the tuple path opens
        (and then forgets) one more per full reply. The children are opened and stat'ed first,
        then registered under one lock round trip; a failure closes what it opened and counts no
        lookup."""
        with self._using(ino, dir_only=True) as p:
            entries = self._listing(fh, offset)
            heads: list[tuple[int, bytes, int]] = []  # (index, name, type) of "." and ".." (first in a listing)
            used = 0
            first = offset
            while first < 2 and first < len(entries):
                name, _hino, typ = entries[first]
                rec = (_DP_SIZE + len(name) + 7) & ~7
                if used + rec > size:
                    first = len(entries)  # full: no child after a head that did not fit
                    break
                heads.append((first, name, typ))
                used += rec
                first += 1
            opened: list[tuple[int, bytes, int, int, os.stat_result]] = []  # (index, name, type, fd, st)
            pfd = p.fd
            open_, fstat = os.open, os.fstat
            try:
                for k in range(first, len(entries)):
                    name, _hino, typ = entries[k]
                    rec = (_DP_SIZE + len(name) + 7) & ~7
                    if used + rec > size:
                        break
                    try:
                        fd = open_(name, _LISTED_FLAGS, dir_fd=pfd)
                    except FileNotFoundError:
                        log.debug("readdirplus(%d): %r was removed since the listing; left out", ino, name)
                        continue
                    try:
                        st = fstat(fd)
                    except BaseException:
                        os.close(fd)
                        raise
                    opened.append((k, name, typ, fd, st))
                    used += rec
            except BaseException:
                for _k, _n, _t, fd, _st in opened:
                    os.close(fd)
                raise
        nodeids = self._register_many(opened)
        buf = bytearray(used)
        pack = _DP_PACK_INTO
        pos = 0
        for k, name, typ in heads:  # (the listing's "." and "..": the directory's own number)
            d_ino = dotdot if dotdot and name == b".." else ino | base
            nl = len(name)
            pack(buf, pos, 0, 0, 0, 0, 0, 0, d_ino, 0, 0, 0, 0, 0, 0, 0, 0, typ, 0, 0, 0, 0, 0, 0, d_ino, k + 1, nl,
                 typ >> 12)
            buf[pos + _DP_SIZE : pos + _DP_SIZE + nl] = name
            pos += (_DP_SIZE + nl + 7) & ~7
        es, ens = split_timeout(self.entry_timeout)
        as_, ans = split_timeout(self.attr_timeout)
        for (k, name, typ, _fd, st), nodeid in zip(opened, nodeids, strict=True):
            a_ino = st[1] | base
            nl = len(name)
            pack(buf, pos, nodeid | base, 0, es, as_, ens, ans, a_ino, st[6], st.st_blocks, st[7], st[8], st[9],
                 st.st_atime_ns % _NS, st.st_mtime_ns % _NS, st.st_ctime_ns % _NS, st[0], st[3], st[4], st[5],
                 st.st_rdev, st.st_blksize, 0, a_ino or nodeid | base, k + 1, nl, typ >> 12)
            buf[pos + _DP_SIZE : pos + _DP_SIZE + nl] = name
            pos += (_DP_SIZE + nl + 7) & ~7
        return buf

    def _register_many(self, opened: list[tuple[int, bytes, int, int, os.stat_result]]) -> list[int]:
        """`_register` of several fresh O_PATH fds with their fstat (ours: no request shares
        them) in one lock round trip; their inode numbers. The fds of inodes already known are
        closed after it."""
        if not opened:
            return []
        nodeids: list[int] = []
        dup: list[int] = []
        new = _Inode
        with self._lock:
            inodes, by_key = self._inodes, self._by_key  # (destroy() swaps them under the lock)
            next_ino = self._next_ino
            for _k, _n, _t, fd, st in opened:
                key = (st[2], st[1])  # (st_dev, st_ino)
                ino = by_key.get(key)
                if ino is not None:
                    dup.append(fd)
                    inodes[ino].nlookup += 1
                else:
                    ino = next_ino
                    next_ino += 1
                    inodes[ino] = new(ino, fd, key, st[0] & _S_IFMT, 1)
                    by_key[key] = ino
                nodeids.append(ino)
            self._next_ino = next_ino
        for fd in dup:
            os.close(fd)
        return nodeids

    def forget(self, ino: int, nlookup: int) -> None:
        if ino == ROOT_ID:
            return
        with self._lock:
            node = self._inodes.get(ino)
            if node is None:
                return
            node.nlookup -= nlookup
            if node.nlookup > 0:
                return
            del self._inodes[ino]
            if self._by_key.get(node.key) == ino:
                del self._by_key[node.key]
            node.dead = True
        node.close_if_unused()

    def getattr(self, ino: int) -> tuple[FuseAttr, float]:
        with self._using(ino) as node:
            return self._attr(os.fstat(node.fd)), self.attr_timeout

    def readlink(self, ino: int) -> bytes:
        with self._using(ino) as node:
            if not stat.S_ISLNK(node.mode):
                raise FuseError(errno.EINVAL)
            return _readlink_fd(node.fd)

    def statfs(self, ino: int) -> StatFs:
        with self._using(ino) as node:
            v = os.statvfs(_proc(node.fd))
        return StatFs(v.f_blocks, v.f_bfree, v.f_bavail, v.f_files, v.f_ffree, v.f_bsize, v.f_namemax, v.f_frsize)

    # -- handles -----------------------------------------------------------------------------
    def _new_handle(self, fd: int, is_dir: bool = False, writes: bool = True) -> int:
        h = _Handle(fd, is_dir, writes)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = h
        return fh

    def _reopen(self, node: _Inode, flags: int) -> int:
        """A real fd for the inode (the caller holds it), through /proc/self/fd."""
        mode = node.mode  # (S_IFMT bits only: compared, not stat.S_IS*() calls, on every OPEN)
        if mode != stat.S_IFREG and mode != stat.S_IFDIR:
            if mode == stat.S_IFLNK:
                raise FuseError(errno.ELOOP)
            raise FuseError(errno.EACCES)  # never open device nodes, FIFOs or sockets of the host
        # O_DIRECT stays in the guest (as virtiofsd does by default): our buffers are not
        # aligned for it, and the guest's page cache choice says nothing about the host's
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_DIRECT)
        return self._proc.reopen(node.fd, flags)

    def open(self, ino: int, flags: int) -> tuple[int, int]:
        with self._using(ino) as node:
            if node.mode == stat.S_IFDIR:
                raise FuseError(errno.EISDIR)
            if flags & _READ_ONLY_REFUSED and not self.writable:
                raise FuseError(errno.EROFS)
            fd = self._reopen(node, flags)
        writes = flags & os.O_ACCMODE != os.O_RDONLY
        # a read-only handle's FLUSH has nothing to do here (see flush): FOPEN_NOFLUSH tells the
        # kernel (5.17+; ignored with a writeback cache, which we never ask for) not to send it,
        # one request less per open-read-close of a file
        return self._new_handle(fd, writes=writes), 0 if writes else _NOFLUSH

    def read(self, ino: int, fh: int, offset: int, size: int) -> bytes:
        if fh:  # the hot path: straight to the handle
            with self._using_handle(fh) as h:
                return os.pread(h.fd, size, offset)
        with self._using_io(ino, 0) as held:
            return os.pread(held.io_fd, size, offset)

    def read_into(self, ino: int, fh: int, offset: int, size: int, dest: ReadDest, nowait: bool = False) -> int:
        """preadv straight into `dest` (virtio-fs: the guest's buffers); `nowait` reads only
        what the host's page cache holds (RWF_NOWAIT), and gives up (WouldBlock) on less than
        the request short of the end of the file."""
        if nowait and not self.nowait_supported:
            raise WouldBlock
        with self._using_handle(fh) if fh else self._using_io(ino, 0) as held:
            fd = held.io_fd
            if nowait:
                return dest.fill(partial(self._preadv_nowait, fd, offset, dest.size))
            return dest.fill(partial(_preadv_full, fd, offset, dest.size))

    def _preadv_nowait(self, fd: int, offset: int, size: int, bufs: list[memoryview]) -> int:
        if len(bufs) > _IOV_MAX:
            raise WouldBlock
        try:
            n = os.preadv(fd, bufs, offset, os.RWF_NOWAIT)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                raise WouldBlock from None
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.nowait_supported = False
                self.nowait_refused += 1
                log.warning("the shared directory's filesystem refuses RWF_NOWAIT reads (%s); every READ "
                            "goes to the worker pool", e)
                raise WouldBlock from None
            raise
        if n == size or (offset + n) & _PAGE_MASK:
            # all of it, or it stopped inside a page: at the end of the file (the page cache
            # reads whole pages, so a read missing one stops at its start; a small file's READ
            # needs no fstat to tell)
            return n
        if offset + n >= os.fstat(fd).st_size:
            return n  # a short read at the end of the file, on a page boundary
        raise WouldBlock  # the rest is not in the page cache

    def write(self, ino: int, fh: int, offset: int, data: memoryview, flags: int) -> int:
        self._check_writable()
        with self._using_handle(fh) as h:
            return os.pwrite(h.fd, data, offset)

    def flush(self, ino: int, fh: int) -> None:
        if not fh:
            return  # no OPEN was sent, so there is no file of the guest's to close
        # close(dup(fd)): what close(2) of the guest's file means on the host (NFS-style
        # deferred write errors; POSIX locks, which we never take). A handle opened read-only
        # has written nothing, so there is nothing to report: a `cat` of many small files
        # sends one FLUSH per file.
        with self._using_handle(fh) as h:
            if h.writes:
                os.close(os.dup(h.fd))

    def release(self, ino: int, fh: int) -> None:
        with self._lock:
            h = self._handles.pop(fh, None)
            if h is None:
                return
            h.dead = True
        h.close_if_unused()

    def fsync(self, ino: int, fh: int, datasync: bool) -> None:
        with self._using_io(ino, fh) as held:
            if datasync:
                os.fdatasync(held.io_fd)
            else:
                os.fsync(held.io_fd)

    def fsyncdir(self, ino: int, fh: int, datasync: bool) -> None:
        self.fsync(ino, fh, datasync)

    def fallocate(self, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        self._check_writable()
        if mode:
            raise FuseError(errno.EOPNOTSUPP)
        with self._using_handle(fh) as h:
            os.posix_fallocate(h.fd, offset, length)

    def lseek(self, ino: int, fh: int, offset: int, whence: int) -> int:
        with self._using_io(ino, fh) as held:
            return os.lseek(held.io_fd, offset, whence)

    # -- directories -------------------------------------------------------------------------
    def opendir(self, ino: int, flags: int) -> tuple[int, int]:
        with self._using(ino, dir_only=True) as node:
            fd = self._reopen(node, os.O_RDONLY | os.O_DIRECTORY)
        return self._new_handle(fd, is_dir=True), 0

    def releasedir(self, ino: int, fh: int) -> None:
        self.release(ino, fh)

    def readdir(self, ino: int, fh: int, offset: int) -> Iterator[DirEntryTuple]:
        return _entries_from(self._listing(fh, offset), offset, ino)

    def _listing(self, fh: int, offset: int) -> list[tuple[bytes, int, int]]:
        """The listing of directory handle `fh` (EBADF if it is none): taken afresh at offset 0,
        a snapshot per pass over the directory, so cookies stay stable under changes."""
        with self._using_handle(fh) as h:
            if not h.is_dir:
                raise FuseError(errno.EBADF)
            entries = h.entries
            if entries is None or offset == 0:
                entries = h.entries = _scan(h.fd)
        return entries

    # -- creating ----------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if not self.writable:
            raise FuseError(errno.EROFS)

    def _finish(self, p: _Inode, name: bytes, fmt: int, caller: Caller | None,
                key: tuple[int, int] | None = None) -> Entry:
        """Open, check, chown and register what was just made at `name` in `p` (held by the
        caller) (of type `fmt`; the host inode `key` if already known). On any failure the name
        is removed again — if it still names what we made — so a failed create leaves nothing
        behind."""
        try:
            if key is None:
                st = os.stat(name, dir_fd=p.fd, follow_symlinks=False)
                key = (st.st_dev, st.st_ino)
            fd = self._open_child(p, name)
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != key or stat.S_IFMT(st.st_mode) != fmt:
                    raise FuseError(errno.EIO, f"{name!r} was replaced while being created")
                if caller is not None and self._chown:
                    _fchown_empty(fd, caller.uid, caller.gid)
            except BaseException:
                os.close(fd)
                raise
            return self._register(fd)
        except BaseException:
            log.warning("passthrough: could not finish creating %r; removing it again", name)
            self._undo(p, name, key, fmt)
            raise

    def _undo(self, p: _Inode, name: bytes, key: tuple[int, int] | None, fmt: int) -> None:
        if key is None:
            log.error("passthrough: %r was made but could not be identified; left in place", name)
            return
        try:
            st = os.stat(name, dir_fd=p.fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != key:
                return  # the name is someone else's by now
            if fmt == stat.S_IFDIR:
                os.rmdir(name, dir_fd=p.fd)
            else:
                os.unlink(name, dir_fd=p.fd)
        except OSError as e:
            log.error("passthrough: could not remove half-created %r: %s", name, e)

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Entry:
        with self._parent(parent, name) as p:
            os.mkdir(name, mode & 0o7777, dir_fd=p.fd)
            return self._finish(p, name, stat.S_IFDIR, caller)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Entry:
        with self._parent(parent, name) as p:
            fmt = stat.S_IFMT(mode)
            if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
                raise FuseError(errno.EPERM)  # no device nodes on the host from a guest
            os.mknod(name, fmt | (mode & 0o7777), 0, dir_fd=p.fd)
            return self._finish(p, name, fmt, caller)

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Entry:
        with self._parent(parent, name) as p:
            if not target or b"\0" in target:
                raise FuseError(errno.EINVAL)
            os.symlink(target, name, dir_fd=p.fd)
            return self._finish(p, name, stat.S_IFLNK, caller)

    def link(self, ino: int, newparent: int, newname: bytes) -> Entry:
        with self._parent(newparent, newname) as p, self._using(ino) as node:
            if stat.S_ISDIR(node.mode):
                raise FuseError(errno.EPERM)
            _link_empty(node.fd, p.fd, newname)
            return self._finish(p, newname, node.mode, None, node.key)

    def create(self, parent: int, name: bytes, mode: int, flags: int, caller: Caller) -> tuple[Entry, int, int]:
        oflags = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_DIRECT | os.O_PATH
                           | os.O_TMPFILE)
        with self._parent(parent, name) as p:
            try:
                # O_EXCL always: an existing name is never opened with O_CREAT (a FIFO would
                # block, a device would be opened) but looked at first, below
                fd = openat_beneath(p.fd, name, oflags | os.O_CREAT | os.O_EXCL, mode & 0o7777)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                return self._open_existing(p, name, oflags)
            try:
                st = os.fstat(fd)
                entry = self._finish(p, name, stat.S_IFREG, caller, (st.st_dev, st.st_ino))
            except BaseException:
                os.close(fd)
                raise
        return entry, self._new_handle(fd), 0

    def _open_existing(self, p: _Inode, name: bytes, flags: int) -> tuple[Entry, int, int]:
        """CREATE of a name that exists (the guest did not ask for O_EXCL): open it like OPEN
        would, regular files only and never through a symlink."""
        opath = self._open_child(p, name)
        try:
            st = os.fstat(opath)
            if stat.S_ISLNK(st.st_mode):
                raise FuseError(errno.ELOOP)
            if not stat.S_ISREG(st.st_mode):
                raise FuseError(errno.EACCES)  # never open device nodes, FIFOs or sockets of the host
            fd = os.open(_proc(opath), flags | os.O_CLOEXEC)
        except BaseException:
            os.close(opath)
            raise
        try:
            entry = self._register(opath)
        except BaseException:
            os.close(fd)
            raise
        return entry, self._new_handle(fd), 0

    def unlink(self, parent: int, name: bytes) -> None:
        with self._parent(parent, name) as p:
            os.unlink(name, dir_fd=p.fd)

    def rmdir(self, parent: int, name: bytes) -> None:
        with self._parent(parent, name) as p:
            os.rmdir(name, dir_fd=p.fd)

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        with self._parent(parent, name) as p, self._parent(newparent, newname) as np:
            if flags & ~RENAME_FLAGS:
                raise FuseError(errno.EINVAL)
            if flags:
                _renameat2(p.fd, name, np.fd, newname, flags)
            else:
                os.rename(name, newname, src_dir_fd=p.fd, dst_dir_fd=np.fd)

    # -- attributes --------------------------------------------------------------------------
    def setattr(self, ino: int, attr: SetAttr) -> tuple[FuseAttr, float]:
        self._check_writable()
        with self._using(ino) as node:
            valid = attr.valid
            is_link = stat.S_ISLNK(node.mode)
            if is_link and valid & (FATTR_MODE | FATTR_SIZE | FATTR_ATIME | FATTR_MTIME):
                raise FuseError(errno.EOPNOTSUPP)  # would follow the link through /proc
            if valid & FATTR_MODE:
                os.chmod(_proc(node.fd), stat.S_IMODE(attr.mode))
            if valid & (FATTR_UID | FATTR_GID):
                _fchown_empty(node.fd, attr.uid if valid & FATTR_UID else -1,
                              attr.gid if valid & FATTR_GID else -1)
            if valid & FATTR_SIZE:
                self._truncate(node, attr.fh, attr.size)
            if valid & (FATTR_ATIME | FATTR_MTIME):
                st = os.fstat(node.fd)
                now = time.time_ns()
                at = st.st_atime_ns
                mt = st.st_mtime_ns
                if valid & FATTR_ATIME:
                    at = now if valid & FATTR_ATIME_NOW else attr.atime * 1_000_000_000 + attr.atime_nsec
                if valid & FATTR_MTIME:
                    mt = now if valid & FATTR_MTIME_NOW else attr.mtime * 1_000_000_000 + attr.mtime_nsec
                os.utime(_proc(node.fd), ns=(at, mt))
            return self._attr(os.fstat(node.fd)), self.attr_timeout

    def _truncate(self, node: _Inode, fh: int | None, size: int) -> None:
        """Through the guest's handle if it sent a live one, else a write-only reopen."""
        if fh is not None:
            try:
                h = self._using_handle(fh)
            except FuseError:
                pass  # released meanwhile (or never ours): truncate through the inode
            else:
                with h:
                    os.ftruncate(h.fd, size)
                return
        fd = self._reopen(node, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    # -- xattrs ------------------------------------------------------------------------------
    def _xattr_node(self, ino: int) -> _Inode:
        """Inode `ino` held for an xattr change (ENOSYS without xattrs, EPERM for a symlink)."""
        if not self.xattr:
            raise FuseError(errno.ENOSYS)
        node = self._using(ino)
        if stat.S_ISLNK(node.mode):
            node.__exit__(None, None, None)
            raise FuseError(errno.EPERM)
        return node

    def getxattr(self, ino: int, name: bytes) -> bytes:
        with self._using(ino) as node:
            if not self.xattr:
                raise FuseError(errno.ENOSYS)
            if stat.S_ISLNK(node.mode):
                raise FuseError(errno.ENODATA)
            return os.getxattr(_proc(node.fd), name)

    def listxattr(self, ino: int) -> list[bytes]:
        with self._using(ino) as node:
            if not self.xattr:
                raise FuseError(errno.ENOSYS)
            if stat.S_ISLNK(node.mode):
                return []
            names = os.listxattr(_proc(node.fd))
        return [os.fsencode(n) for n in names]

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        self._check_writable()
        with self._xattr_node(ino) as node:
            os.setxattr(_proc(node.fd), name, value, flags)

    def removexattr(self, ino: int, name: bytes) -> None:
        self._check_writable()
        with self._xattr_node(ino) as node:
            os.removexattr(_proc(node.fd), name)


def _scan(fd: int) -> list[tuple[bytes, int, int]]:
    """(name, host ino, S_IFMT type) of every entry of the directory open at `fd` (held by the
    caller), "." and ".." first."""
    entries = [(b".", 0, stat.S_IFDIR), (b"..", 0, stat.S_IFDIR)]
    with os.scandir(os.fsencode(_proc(fd))) as it:  # (bytes names: no fsencode per entry)
        for e in it:
            # d_type answers these without a syscall; only odd types need an lstat
            try:
                if e.is_dir(follow_symlinks=False):
                    typ = stat.S_IFDIR
                elif e.is_file(follow_symlinks=False):
                    typ = stat.S_IFREG
                elif e.is_symlink():
                    typ = stat.S_IFLNK
                else:
                    typ = stat.S_IFMT(e.stat(follow_symlinks=False).st_mode)
            except OSError:
                continue
            name = e.name
            if len(name) > NAME_MAX or b"/" in name:  # (never from getdents: checked once here, not per reply)
                log.error("passthrough: skipping invalid name %r in a listing", name)
                continue
            entries.append((name, e.inode(), typ))
    return entries


def _entries_from(entries: list[tuple[bytes, int, int]], offset: int, ino: int) -> Iterator[DirEntryTuple]:
    for i in range(offset, len(entries)):
        name, hino, typ = entries[i]
        yield name, hino or ino, typ, i + 1


def _readlink_fd(fd: int) -> bytes:
    """readlinkat(fd, "") of an O_PATH|O_NOFOLLOW symlink fd."""
    buf = ctypes.create_string_buffer(4097)  # PATH_MAX + 1: never a silent truncation
    n = _libc.readlinkat(fd, b"", buf, len(buf))
    _check(n, "readlinkat")
    return buf.raw[:n]
