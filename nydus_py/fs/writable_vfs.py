"""A `Vfs` that also routes mutating requests, for virtio-fs shares that mix read-only RAFS images
with a writable passthrough (Kata: `/containers` read-write, `/rafs/<id>/lowerdir` read-only).

A request goes to the filesystem that owns its inode only if that filesystem is `writable`;
everything else (RAFS, the pseudo directories that lead to mountpoints) answers EROFS, and so
does an OPEN for writing or with O_TRUNC/O_CREAT. RENAME/LINK across two filesystems answer
EXDEV, as the kernel does between mounts. The pseudo root never asks the kernel to skip OPEN
(NO_OPEN_SUPPORT is session-wide, and a passthrough filesystem wants real handles). A
read-only filesystem mounted at / (`nydusd-py virtiofs --bootstrap`: one RAFS image is the
share, and nothing can be mounted beside it) keeps what it asks for, as over /dev/fuse: the
guest then sends no OPEN/RELEASE per file and no OPENDIR/RELEASEDIR per directory (a `cat` of
small files costs LOOKUP and READ; virtiofsd's share costs twice that), and mutating requests
answer EROFS, a write OPEN included (the session is read-only). While a connection
was set up so, a writable filesystem cannot be mounted (its handles would never be asked for).
"""

import errno
import os
from collections.abc import Callable
from typing import Any, TypeVar

from ..fuse.abi import InitFlags
from ..fuse.api import (
    OPEN_MUTATING_FLAGS,
    Caller,
    Entry,
    Filesystem,
    FuseAttr,
    FuseError,
    OpenResult,
    SetAttr,
)
from ..vfs.vfs import Entered, Vfs, VfsError

T = TypeVar("T")


class WritableVfs(Vfs):
    # Whether the session routes mutating requests at all (it asks after init()): not while a
    # read-only filesystem at / is the whole share, where nothing writable is reachable and a
    # write OPEN must be EROFS before the kernel learns to skip OPEN.
    writable = True

    def __init__(self) -> None:
        super().__init__()
        self._read_only = False  # INIT made the connection read-only (until it goes)

    def init(self, capable: InitFlags) -> InitFlags:
        """No POSIX_ACL (which the Vfs asks for): for a writable layer it also changes how
        creates treat the umask and the parent's default ACL, which the passthrough was not
        written or tested for; the read-only images beside it lose only ACL caching. No
        NO_OPEN/NO_OPENDIR_SUPPORT either, unless a read-only filesystem is the whole share."""
        want = super().init(capable) & ~InitFlags.POSIX_ACL
        root = self._rootfs
        self.writable = root is None or bool(getattr(root.fs, "writable", False))
        if self.writable:
            want &= ~(InitFlags.NO_OPEN_SUPPORT | InitFlags.NO_OPENDIR_SUPPORT)
        return want

    def negotiated(self, flags: InitFlags) -> None:
        super().negotiated(flags)
        self._read_only = not self.writable

    def destroy(self) -> None:
        self._read_only = False
        self.writable = True
        super().destroy()

    def mount(self, path: str, fs: Filesystem, index: int | None = None) -> int:
        """Vfs.mount, refusing a writable filesystem on a connection INIT made read-only (a
        read-only filesystem was the share then, unmounted since): its writes would be EROFS
        and its handles never asked for."""
        if self._read_only and getattr(fs, "writable", False):
            raise VfsError(f"cannot mount a writable filesystem at {path}: this connection was set up read-only "
                           "(for the read-only filesystem that was at /); it needs a new connection", errno.EBUSY)
        return super().mount(path, fs, index)

    def _route(self, ino: int, fn: Callable[[Any, int], T], *, write: bool = True) -> T:
        """Call `fn(fs, inner_ino)` inside the filesystem owning `ino` (EROFS if it is not
        writable or `ino` is a pseudo directory)."""
        if self._pseudo_node(ino) is not None:
            raise FuseError(errno.EROFS)
        with self.entered(ino) as (fs, inner):
            if write and not getattr(fs, "writable", False):
                raise FuseError(errno.EROFS)
            return fn(fs, inner)

    def _entered_writable(self, parent: int) -> Entered:
        """`entered(parent)` when a writable filesystem owns it, else EROFS."""
        if self._pseudo_node(parent) is not None:
            raise FuseError(errno.EROFS)
        e = self.entered(parent)
        if not getattr(e.slot.fs, "writable", False):
            self._leave(e.slot)
            raise FuseError(errno.EROFS)
        return e

    def _entry(self, parent: int, fn: Callable[[Any, int], Entry]) -> Entry:
        e = self._entered_writable(parent)
        with e as (fs, inner):
            return self._fix_entry(e.slot, fn(fs, inner))

    def _same_fs(self, a: int, b: int) -> None:
        if self._pseudo_node(a) is not None or self._pseudo_node(b) is not None:
            raise FuseError(errno.EROFS)
        with self.entered(a) as (fa, _), self.entered(b) as (fb, _):
            if fa is not fb:
                raise FuseError(errno.EXDEV)

    # -- opens ---------------------------------------------------------------------------------
    def open(self, ino: int, flags: int) -> OpenResult:
        if flags & (os.O_ACCMODE | OPEN_MUTATING_FLAGS):  # O_TRUNC writes even with O_RDONLY
            return self._route(ino, lambda fs, i: fs.open(i, flags))
        return super().open(ino, flags)

    def create(self, parent: int, name: bytes, mode: int, flags: int, caller: Caller) -> tuple[Entry, int, int]:
        e = self._entered_writable(parent)
        with e as (fs, inner):
            entry, fh, open_flags = fs.create(inner, name, mode, flags, caller)
            return self._fix_entry(e.slot, entry), fh, open_flags

    # -- single inode --------------------------------------------------------------------------
    def setattr(self, ino: int, attr: SetAttr) -> tuple[FuseAttr, float]:
        a, timeout = self._route(ino, lambda fs, i: fs.setattr(i, attr))
        # as Vfs.getattr reports it: the kernel's inode number for a filesystem under a path
        return (a._replace(ino=ino) if self.split(ino)[0] else a), timeout

    def write(self, ino: int, fh: int, offset: int, data: memoryview, flags: int) -> int:
        return self._route(ino, lambda fs, i: fs.write(i, fh, offset, data, flags))

    def fsync(self, ino: int, fh: int, datasync: bool) -> None:
        self._route(ino, lambda fs, i: fs.fsync(i, fh, datasync), write=False)

    def fsyncdir(self, ino: int, fh: int, datasync: bool) -> None:
        self._route(ino, lambda fs, i: fs.fsyncdir(i, fh, datasync), write=False)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        self._route(ino, lambda fs, i: fs.setxattr(i, name, value, flags))

    def removexattr(self, ino: int, name: bytes) -> None:
        self._route(ino, lambda fs, i: fs.removexattr(i, name))

    def fallocate(self, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        self._route(ino, lambda fs, i: fs.fallocate(i, fh, offset, length, mode))

    # -- in a directory ------------------------------------------------------------------------
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Entry:
        return self._entry(parent, lambda fs, p: fs.mknod(p, name, mode, rdev, caller))

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Entry:
        return self._entry(parent, lambda fs, p: fs.mkdir(p, name, mode, caller))

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Entry:
        return self._entry(parent, lambda fs, p: fs.symlink(p, name, target, caller))

    def unlink(self, parent: int, name: bytes) -> None:
        self._route(parent, lambda fs, p: fs.unlink(p, name))

    def rmdir(self, parent: int, name: bytes) -> None:
        self._route(parent, lambda fs, p: fs.rmdir(p, name))

    def link(self, ino: int, newparent: int, newname: bytes) -> Entry:
        self._same_fs(ino, newparent)
        inner = self.split(ino)[1]
        return self._entry(newparent, lambda fs, p: fs.link(inner, p, newname))

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int) -> None:
        self._same_fs(parent, newparent)
        inner = self.split(newparent)[1]
        self._route(parent, lambda fs, p: fs.rename(p, name, inner, newname, flags))
