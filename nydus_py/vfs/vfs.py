"""One FUSE namespace for many filesystems: a pseudo root that routes sub-trees to mounted ones.

Model: fuse-backend-rs `Vfs` as nydusd uses it. A filesystem mounted at a path (``/<sid>`` for the
snapshotter's shared daemon, ``/rafs/<cid>/lowerdir`` for Kata) gets an index 1..255 and its
inode ``i`` is shown to the kernel as ``(index << 56) | i``, so inode numbers of different
filesystems never collide (overlayfs on the host needs distinct st_ino under one st_dev). Index 0
is the pseudo filesystem: the directories that lead to the mountpoints, created on demand and
removed again when the last mount under them goes.

Dedicated mode mounts one filesystem at ``/``: it then answers for the kernel's root itself and
its inode numbers are passed through unchanged (no per-request translation at all).

Mount and umount happen while requests are served: each mounted filesystem counts the requests
inside it, and umount waits for those to finish before handing the filesystem back to be closed.
"""

import errno
import logging
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..fuse.abi import InitFlags
from ..fuse.api import (
    DEFAULT_WANT,
    DirEntryPlusTuple,
    DirEntryTuple,
    Entry,
    Filesystem,
    FuseAttr,
    FuseError,
    OpenResult,
    StatFs,
)
from ..fuse.iovec import ReadDest
from ..fuse.protocol import notify_inval_entry, notify_inval_inode

log = logging.getLogger(__name__)

ROOT_ID = 1
INO_SHIFT = 56
INO_MASK = (1 << INO_SHIFT) - 1
MAX_INDEX = 255
# Pseudo directories live in index 0, far above any inode a filesystem mounted at "/" uses.
PSEUDO_BASE = 1 << 48
PSEUDO_TIMEOUT = 1.0  # pseudo entries change with mounts: let the kernel re-check soon


class VfsError(ValueError):
    """A mount table operation that cannot be done (the message says why)."""

    def __init__(self, message: str, errno_: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = errno_


def normalize_path(path: str) -> str:
    """``/a/b`` form of a mountpoint; VfsError for empty, relative or dot components."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise VfsError(f"mountpoint {path!r} must be an absolute path")
    parts = [p for p in path.split("/") if p]
    for p in parts:
        if p in (".", "..") or "\0" in p or len(p.encode()) > 255:
            raise VfsError(f"mountpoint {path!r} has an invalid component {p!r}")
    return "/" + "/".join(parts)


@dataclass(eq=False)
class _Pseudo:
    ino: int
    name: bytes
    parent: "_Pseudo | None"
    children: dict[bytes, "_Pseudo | _Slot"] = field(default_factory=dict)


@dataclass(eq=False)
class _Slot:
    index: int
    path: str
    fs: Filesystem
    parent: _Pseudo | None  # None for the filesystem at "/"
    name: bytes
    base: int  # index << 56, 0 at "/"
    active: int = 0
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    idle: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.idle = threading.Condition(self.lock)

    def inner(self, kernel_ino: int) -> int:
        """The filesystem's own inode number of a kernel inode routed to this slot."""
        return kernel_ino & INO_MASK if self.base else kernel_ino

    @property
    def kernel_root(self) -> int:
        return ROOT_ID if self.base == 0 else self.base | ROOT_ID


class Entered:
    """`with vfs.entered(ino) as (fs, inner):` the slot stays entered (not torn down by an umount
    or a hot swap) until the block ends. A class, not a generator: it is on every request."""

    __slots__ = ("inner", "slot")

    def __init__(self, slot: _Slot, inner: int) -> None:
        self.slot = slot
        self.inner = inner

    def __enter__(self) -> tuple[Filesystem, int]:
        return self.slot.fs, self.inner

    def __exit__(self, *exc: object) -> None:
        Vfs._leave(self.slot)


def _attr_with_ino(a: FuseAttr, ino: int) -> FuseAttr:
    return FuseAttr(ino, *a[1:])


class Vfs(Filesystem):
    """The pseudo root plus the mount table; a `Filesystem` for FuseSession (fusedev or virtio-fs)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        now = int(time.time())
        self._mtime = now
        self.root = _Pseudo(ROOT_ID, b"", None)
        self._pseudo: dict[int, _Pseudo] = {ROOT_ID: self.root}
        self._next_pseudo = PSEUDO_BASE
        self._slots: list[_Slot | None] = [None] * (MAX_INDEX + 1)
        self._by_path: dict[str, _Slot] = {}
        self._rootfs: _Slot | None = None  # a filesystem mounted at "/"
        self._last_index = 0
        self._initialized = False
        self._capable = InitFlags(0)
        # Writes a notification to the kernel (set by the transport; None: nothing to tell).
        self.notifier: Callable[[bytes], None] | None = None

    # -- mount table ---------------------------------------------------------------------------
    def mount(self, path: str, fs: Filesystem, index: int | None = None) -> int:
        """Attach `fs` at `path`; returns its index (0 for "/"). Intermediate directories are
        created. VfsError if the path is taken, is under a filesystem, or no index is free."""
        path = normalize_path(path)
        with self._lock:
            if path in self._by_path:
                raise VfsError(f"{path} is already mounted", errno.EEXIST)
            if path == "/":
                if self._by_path or len(self.root.children):
                    raise VfsError("cannot mount at / while other filesystems are mounted", errno.EBUSY)
                slot = _Slot(0, "/", fs, None, b"", 0)
                self._by_path["/"] = slot
                self._rootfs = slot
                self._init_fs(fs)
                return 0
            if self._rootfs is not None:
                raise VfsError(f"cannot mount {path}: a filesystem is mounted at /", errno.EBUSY)
            idx = self._alloc_index(index)
            names = [p.encode() for p in path.split("/")[1:]]
            parent = self.root
            created: list[_Pseudo] = []
            for name in names[:-1]:
                child = parent.children.get(name)
                if isinstance(child, _Slot):
                    self._prune(created)
                    raise VfsError(f"cannot mount {path}: {child.path} is a mounted filesystem", errno.EBUSY)
                if child is None:
                    child = _Pseudo(self._new_pseudo_ino(), name, parent)
                    parent.children[name] = child
                    self._pseudo[child.ino] = child
                    created.append(child)
                parent = child
            last = names[-1]
            existing = parent.children.get(last)
            if existing is not None:
                self._prune(created)
                what = "a mounted filesystem" if isinstance(existing, _Slot) else "a directory with mounts below it"
                raise VfsError(f"cannot mount {path}: it is {what}", errno.EBUSY)
            slot = _Slot(idx, path, fs, parent, last, idx << INO_SHIFT)
            self._slots[idx] = slot
            self._by_path[path] = slot
            parent.children[last] = slot
            self._init_fs(fs)
            self._last_index = idx
        self._notify_entry(parent.ino, last)
        return idx

    def _init_fs(self, fs: Filesystem) -> None:
        if self._initialized:
            try:
                fs.init(self._capable)
            except Exception:
                log.exception("init() of a filesystem mounted at run time failed")

    def _alloc_index(self, index: int | None) -> int:
        if index is not None:
            if not 1 <= index <= MAX_INDEX or self._slots[index] is not None:
                raise VfsError(f"filesystem index {index} is not free", errno.EBUSY)
            return index
        # Round robin from the last one handed out: an index (and so its inode numbers) is
        # reused as late as possible after an umount.
        for k in range(MAX_INDEX):
            i = (self._last_index + k) % MAX_INDEX + 1
            if self._slots[i] is None:
                return i
        raise VfsError(f"too many filesystems (at most {MAX_INDEX})", errno.ENOSPC)

    def _new_pseudo_ino(self) -> int:
        ino = self._next_pseudo
        self._next_pseudo += 1
        return ino

    def _prune(self, nodes: list[_Pseudo]) -> None:
        for node in reversed(nodes):
            if not node.children and node.parent is not None:
                node.parent.children.pop(node.name, None)
                self._pseudo.pop(node.ino, None)

    def umount(self, path: str, wait: float = 10.0) -> Filesystem:
        """Detach the filesystem at `path` and return it (the caller closes it) once no request
        is inside it any more (or after `wait` seconds, with a warning)."""
        path = normalize_path(path)
        with self._lock:
            slot = self._by_path.pop(path, None)
            if slot is None:
                raise VfsError(f"{path} is not mounted", errno.ENOENT)
            with slot.lock:
                slot.closed = True
            # the topmost name that disappears, for the kernel's dentry cache
            gone: tuple[_Pseudo, bytes] | None = None
            if slot is self._rootfs:
                self._rootfs = None
            else:
                self._slots[slot.index] = None
                assert slot.parent is not None
                slot.parent.children.pop(slot.name, None)
                gone = (slot.parent, slot.name)
                # remove the directories that only led to this mount
                node = slot.parent
                while node.parent is not None and not node.children:
                    node.parent.children.pop(node.name, None)
                    self._pseudo.pop(node.ino, None)
                    gone = (node.parent, node.name)
                    node = node.parent
        if gone is not None:
            self._notify_entry(gone[0].ino, gone[1])
            self._notify(notify_inval_inode(slot.kernel_root, -1))
        deadline = time.monotonic() + wait
        with slot.lock:
            while slot.active:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("umount %s: %d requests still inside after %.0fs", path, slot.active, wait)
                    break
                slot.idle.wait(left)
        return slot.fs

    def mounts(self) -> dict[str, int]:
        """Mountpoint -> filesystem index."""
        with self._lock:
            return {p: s.index for p, s in self._by_path.items()}

    def get(self, path: str) -> Filesystem | None:
        with self._lock:
            slot = self._by_path.get(normalize_path(path))
            return slot.fs if slot is not None else None

    def replace(self, path: str, fs: Filesystem, wait: float = 10.0) -> Filesystem:
        """Swap the filesystem at `path` for `fs` under the same index (remount); returns the
        old one once idle."""
        path = normalize_path(path)
        with self._lock:
            old = self._by_path.get(path)
            if old is None:
                raise VfsError(f"{path} is not mounted", errno.ENOENT)
            new = _Slot(old.index, old.path, fs, old.parent, old.name, old.base)
            self._by_path[path] = new
            if old is self._rootfs:
                self._rootfs = new
            else:
                self._slots[old.index] = new
                assert old.parent is not None
                old.parent.children[old.name] = new
            with old.lock:
                old.closed = True
            self._init_fs(fs)
        if old.parent is not None:
            self._notify_entry(old.parent.ino, old.name)
        self._notify(notify_inval_inode(new.kernel_root, 0))
        deadline = time.monotonic() + wait
        with old.lock:
            while old.active and time.monotonic() < deadline:
                old.idle.wait(max(0.0, deadline - time.monotonic()))
        return old.fs

    def path_of_index(self, index: int) -> str | None:
        if index == 0:
            r = self._rootfs
            return r.path if r is not None else None
        s = self._slots[index] if 0 < index <= MAX_INDEX else None
        return s.path if s is not None else None

    # -- state for takeover ---------------------------------------------------------------------
    def export_layout(self) -> dict[str, Any]:
        """Pseudo inode numbers and mount indexes, so a successor shows the kernel the same inodes."""
        with self._lock:
            pseudo = []
            for ino, node in self._pseudo.items():
                if ino == ROOT_ID:
                    continue
                parts = []
                n: _Pseudo | None = node
                while n is not None and n.parent is not None:
                    parts.append(n.name.decode())
                    n = n.parent
                pseudo.append(["/" + "/".join(reversed(parts)), ino])
            return {"pseudo": sorted(pseudo), "next_pseudo": self._next_pseudo, "last_index": self._last_index,
                    "mounts": {p: s.index for p, s in self._by_path.items()}}

    def restore_layout(self, layout: dict[str, Any]) -> None:
        """Re-create the pseudo directories with their old inode numbers (before re-mounting)."""
        with self._lock:
            for path, ino in sorted(layout.get("pseudo", []), key=lambda x: x[0].count("/")):
                names = [p.encode() for p in normalize_path(path).split("/")[1:]]
                parent = self.root
                for name in names[:-1]:
                    child = parent.children.get(name)
                    if not isinstance(child, _Pseudo):
                        raise VfsError(f"takeover state: {path} has no parent directory")
                    parent = child
                node = _Pseudo(int(ino), names[-1], parent)
                parent.children[names[-1]] = node
                self._pseudo[node.ino] = node
            self._next_pseudo = max(self._next_pseudo, int(layout.get("next_pseudo", PSEUDO_BASE)))
            self._last_index = int(layout.get("last_index", 0))

    # -- routing --------------------------------------------------------------------------------
    def _notify(self, msg: bytes) -> None:
        notifier = self.notifier
        if notifier is None or not self._initialized:
            return
        try:
            notifier(msg)
        except OSError as e:
            # ENOENT: the kernel had nothing cached; anything else is worth a line in the log.
            if e.errno != errno.ENOENT:
                log.warning("FUSE notification failed: %s", e)

    def _notify_entry(self, parent: int, name: bytes) -> None:
        self._notify(notify_inval_entry(parent, name))

    def _slot(self, ino: int) -> _Slot:
        """The mounted filesystem of a kernel inode outside the pseudo fs, entered (active + 1)."""
        idx = ino >> INO_SHIFT
        slot = self._slots[idx] if idx else self._rootfs
        if slot is None:
            raise FuseError(errno.ESTALE)
        with slot.lock:
            if slot.closed:
                raise FuseError(errno.ESTALE)
            slot.active += 1
        return slot

    def entered(self, ino: int) -> Entered:
        """The filesystem of kernel inode `ino` and its own inode number, held entered for a
        `with` block (ESTALE when it is gone)."""
        slot = self._slot(ino)
        return Entered(slot, slot.inner(ino))

    @staticmethod
    def split(kernel_ino: int) -> tuple[int, int]:
        """(filesystem index, the filesystem's own inode number) of a kernel inode number."""
        return kernel_ino >> INO_SHIFT, kernel_ino & INO_MASK

    @staticmethod
    def _leave(slot: _Slot) -> None:
        with slot.lock:
            slot.active -= 1
            if slot.active == 0 and slot.closed:
                slot.idle.notify_all()

    def _pseudo_node(self, ino: int) -> _Pseudo | None:
        """The pseudo directory of `ino`, or None when the inode belongs to a filesystem."""
        if ino >> INO_SHIFT:
            return None
        if self._rootfs is not None:
            return None
        node = self._pseudo.get(ino)
        if node is None:
            raise FuseError(errno.ESTALE if ino >= PSEUDO_BASE else errno.ENOENT)
        return node

    def _pseudo_attr(self, node: _Pseudo) -> FuseAttr:
        subdirs = len(node.children)
        return FuseAttr(ino=node.ino, size=4096, blocks=8, atime=self._mtime, mtime=self._mtime, ctime=self._mtime,
                        mode=stat.S_IFDIR | 0o755, nlink=2 + subdirs, blksize=4096)

    def _pseudo_entry(self, node: _Pseudo) -> Entry:
        return Entry(node.ino, 0, self._pseudo_attr(node), PSEUDO_TIMEOUT, PSEUDO_TIMEOUT)

    def _fix_entry(self, slot: _Slot, e: Entry) -> Entry:
        base = slot.base
        if not base or not e.ino:
            return e
        return Entry(e.ino | base, e.generation, _attr_with_ino(e.attr, e.attr.ino | base), e.entry_timeout,
                     e.attr_timeout)

    def _child_entry(self, child: "_Pseudo | _Slot") -> Entry:
        if isinstance(child, _Pseudo):
            return self._pseudo_entry(child)
        root = child.kernel_root
        with self.entered(root) as (fs, inner):
            attr, timeout = fs.getattr(inner)
            return Entry(root, 0, _attr_with_ino(attr, root), PSEUDO_TIMEOUT, timeout)

    # -- Filesystem API -------------------------------------------------------------------------
    def init(self, capable: InitFlags) -> InitFlags:
        with self._lock:
            self._initialized = True
            self._capable = capable
            slots = list(self._by_path.values())
        want = None
        for s in slots:
            try:
                w = s.fs.init(capable)
            except Exception:
                log.exception("init() of %s failed", s.path)
                continue
            if s is self._rootfs:
                want = w
        if want is not None:
            return want
        # Pseudo directories change with mounts: no NO_OPENDIR_SUPPORT (it implies CACHE_DIR).
        # POSIX_ACL: INIT comes before the images, and the flag holds for the connection, so a
        # shared daemon asks for it up front: images with ACLs get them enforced and every
        # image gets its ACLs (also "none") cached by the kernel. Images without xattrs must then
        # never answer ENOSYS, which would switch xattrs off for all of them (see getxattr).
        return DEFAULT_WANT | InitFlags.NO_OPEN_SUPPORT | InitFlags.POSIX_ACL

    def destroy(self) -> None:
        with self._lock:
            self._initialized = False
            slots = list(self._by_path.values())
        for s in slots:
            try:
                s.fs.destroy()
            except Exception:
                log.exception("destroy() of %s failed", s.path)

    def lookup(self, parent: int, name: bytes) -> Entry:
        if parent >> INO_SHIFT or self._rootfs is not None:
            # (`entered`, inline: on every LOOKUP)
            slot = self._slot(parent)
            try:
                inner = parent & INO_MASK if slot.base else parent
                if name == b".." and inner == ROOT_ID and slot.parent is not None:
                    return self._pseudo_entry(slot.parent)
                return self._fix_entry(slot, slot.fs.lookup(inner, name))
            finally:
                self._leave(slot)
        node = self._pseudo_node(parent)
        assert node is not None  # (index 0 without a filesystem at /: a pseudo node or ENOENT/ESTALE)
        if name == b".":
            return self._pseudo_entry(node)
        if name == b"..":
            return self._pseudo_entry(node.parent or node)
        child = node.children.get(name)
        if child is None:
            raise FuseError(errno.ENOENT)
        return self._child_entry(child)

    def lookup_packed(self, parent: int, name: bytes, base: int = 0) -> bytes | None:
        """The mounted filesystem's packed LOOKUP, its inode numbers moved to its slot as
        `lookup` moves them (None in the pseudo directories and for ".." of a filesystem's root
        below one: `lookup` answers those)."""
        if not parent >> INO_SHIFT and self._rootfs is None:
            return None
        slot = self._slot(parent)
        try:
            inner = parent & INO_MASK if slot.base else parent
            if name == b".." and inner == ROOT_ID and slot.parent is not None:
                return None
            return slot.fs.lookup_packed(inner, name, slot.base)
        finally:
            self._leave(slot)

    def forget(self, ino: int, nlookup: int) -> None:
        self._quietly(ino, "forget", nlookup)

    def batch_forget(self, items: list[tuple[int, int]]) -> None:
        for ino, n in items:
            self.forget(ino, n)

    def _quietly(self, ino: int, op: str, arg: int) -> None:
        """`op(inner ino, arg)` on `ino`'s filesystem, inside its slot, for requests without an
        error reply (FORGET, RELEASE*): nothing for a pseudo directory or a filesystem that is
        gone (nothing left to forget or release)."""
        if not (ino >> INO_SHIFT) and self._rootfs is None:
            return
        try:
            slot = self._slot(ino)
        except FuseError:
            return
        try:
            getattr(slot.fs, op)(slot.inner(ino), arg)
        finally:
            self._leave(slot)

    def getattr(self, ino: int) -> tuple[FuseAttr, float]:
        node = self._pseudo_node(ino)
        if node is not None:
            return self._pseudo_attr(node), PSEUDO_TIMEOUT
        with self.entered(ino) as (fs, inner):
            attr, timeout = fs.getattr(inner)
            return (attr if inner == ino else _attr_with_ino(attr, ino)), timeout

    def readlink(self, ino: int) -> bytes:
        if self._pseudo_node(ino) is not None:
            raise FuseError(errno.EINVAL)
        with self.entered(ino) as (fs, inner):
            return fs.readlink(inner)

    def open(self, ino: int, flags: int) -> OpenResult:
        slot = self._file_slot(ino)  # (`entered`, inline: on every OPEN)
        try:
            return slot.fs.open(ino & INO_MASK if slot.base else ino, flags)
        finally:
            self._leave(slot)

    def _file_slot(self, ino: int) -> _Slot:
        """`entered`'s slot for a file's data request, inline on every READ (the caller leaves
        it): EISDIR for a pseudo directory, ENOENT/ESTALE for no inode."""
        if not ino >> INO_SHIFT and self._rootfs is None:
            self._pseudo_node(ino)  # ENOENT/ESTALE when it is none
            raise FuseError(errno.EISDIR)
        return self._slot(ino)

    def read(self, ino: int, fh: int, offset: int, size: int) -> bytes | bytearray | memoryview:
        slot = self._file_slot(ino)
        try:
            return slot.fs.read(ino & INO_MASK if slot.base else ino, fh, offset, size)
        finally:
            self._leave(slot)

    def _owner(self, ino: int) -> _Slot | None:
        """The slot of `ino`'s filesystem for a hint (`read_waits`, the warm-ups), not entered:
        a filesystem unmounted meanwhile answers the request itself (ESTALE), and a warm-up on
        it fails quietly. None for a pseudo directory or a closed slot."""
        idx = ino >> INO_SHIFT
        slot = self._slots[idx] if idx else self._rootfs
        return None if slot is None or slot.closed else slot

    def warm(self, ino: int, size: int) -> None:
        slot = self._owner(ino)
        if slot is not None:
            slot.fs.warm(slot.inner(ino), size)

    def warm_next_dir(self, ino: int) -> None:
        slot = self._owner(ino)  # (a walk that goes on into another mount's tree lists that one cold)
        if slot is not None:
            slot.fs.warm_next_dir(slot.inner(ino))

    def read_waits(self, ino: int, offset: int = 0, size: int = 0) -> bool:
        """The owning filesystem's answer (`_owner`: a hint only)."""
        slot = self._owner(ino)
        return True if slot is None else slot.fs.read_waits(slot.inner(ino), offset, size)

    def read_into(self, ino: int, fh: int, offset: int, size: int, dest: ReadDest, nowait: bool = False) -> int:
        slot = self._file_slot(ino)
        try:
            return slot.fs.read_into(ino & INO_MASK if slot.base else ino, fh, offset, size, dest, nowait)
        finally:
            self._leave(slot)

    def release(self, ino: int, fh: int) -> None:
        self._quietly(ino, "release", fh)  # (a filesystem that is gone took its handles with it)

    def flush(self, ino: int, fh: int) -> None:
        if self._pseudo_node(ino) is not None:
            raise FuseError(errno.ENOSYS)
        slot = self._slot(ino)  # (`entered`, inline: on every FLUSH)
        try:
            slot.fs.flush(ino & INO_MASK if slot.base else ino, fh)
        finally:
            self._leave(slot)

    def opendir(self, ino: int, flags: int) -> tuple[int, int]:
        if self._pseudo_node(ino) is not None:
            return 0, 0  # listings change with mounts: nothing may be cached
        with self.entered(ino) as (fs, inner):
            return fs.opendir(inner, flags)

    def releasedir(self, ino: int, fh: int) -> None:
        self._quietly(ino, "releasedir", fh)

    def _pseudo_children(self, node: _Pseudo) -> list[tuple[bytes, "_Pseudo | _Slot"]]:
        with self._lock:
            return sorted(node.children.items())

    def readdir(self, ino: int, fh: int, offset: int) -> Iterator[DirEntryTuple]:
        node = self._pseudo_node(ino)
        if node is not None:
            return self._pseudo_readdir(node, offset)
        return self._routed_readdir(self.entered(ino), fh, offset)

    def _pseudo_readdir(self, node: _Pseudo, offset: int) -> Iterator[DirEntryTuple]:
        if offset < 1:
            yield b".", node.ino, stat.S_IFDIR, 1
        if offset < 2:
            yield b"..", (node.parent or node).ino, stat.S_IFDIR, 2
        for k, (name, child) in enumerate(self._pseudo_children(node)):
            if k + 3 <= offset:
                continue
            cino = child.ino if isinstance(child, _Pseudo) else child.kernel_root
            yield name, cino, stat.S_IFDIR, k + 3

    def _routed_readdir(self, e: Entered, fh: int, offset: int) -> Iterator[DirEntryTuple]:
        with e as (fs, inner):
            slot = e.slot
            base = slot.base
            if not base:
                yield from fs.readdir(inner, fh, offset)
                return
            up = slot.parent.ino if inner == ROOT_ID and slot.parent is not None else 0
            for name, cino, typ, off in fs.readdir(inner, fh, offset):
                if up and name == b"..":
                    yield name, up, typ, off
                else:
                    yield name, cino | base, typ, off

    def readdirplus(self, ino: int, fh: int, offset: int) -> Iterator[DirEntryPlusTuple]:
        node = self._pseudo_node(ino)
        if node is not None:
            return self._pseudo_readdirplus(node, offset)
        return self._routed_readdirplus(self.entered(ino), fh, offset)

    def readdirplus_packed(self, ino: int, fh: int, offset: int, size: int, base: int = 0,
                           dotdot: int = 0) -> bytes | bytearray | memoryview | None:
        """The mounted filesystem's packed READDIRPLUS, its inode numbers moved to its slot as
        `_routed_readdirplus` moves them (None for the pseudo directories)."""
        if self._pseudo_node(ino) is not None:
            return None
        e = self.entered(ino)
        with e as (fs, inner):
            slot = e.slot
            up = slot.parent.ino if inner == ROOT_ID and slot.parent is not None else 0
            return fs.readdirplus_packed(inner, fh, offset, size, slot.base, up)

    def _pseudo_readdirplus(self, node: _Pseudo, offset: int) -> Iterator[DirEntryPlusTuple]:
        for name, cino, typ, off in self._pseudo_readdir(node, offset):
            if name in (b".", b".."):
                yield Entry(0, 0, FuseAttr(ino=cino, mode=stat.S_IFDIR), 0.0, 0.0), name, typ, off
                continue
            child = node.children.get(name)
            if child is None:
                continue  # unmounted meanwhile
            try:
                entry = self._child_entry(child)
            except FuseError:
                continue
            yield entry, name, typ, off

    def _routed_readdirplus(self, e: Entered, fh: int, offset: int) -> Iterator[DirEntryPlusTuple]:
        with e as (fs, inner):
            slot = e.slot
            base = slot.base
            if not base:
                yield from fs.readdirplus(inner, fh, offset)
                return
            up = slot.parent.ino if inner == ROOT_ID and slot.parent is not None else 0
            for entry, name, typ, off in fs.readdirplus(inner, fh, offset):
                if entry.ino == 0:  # "." / "..": only the dirent's d_ino is used
                    d_ino = up if (up and name == b"..") else entry.attr.ino | base
                    yield Entry(0, 0, FuseAttr(ino=d_ino, mode=entry.attr.mode), 0.0, 0.0), name, typ, off
                else:
                    yield self._fix_entry(slot, entry), name, typ, off

    def statfs(self, ino: int) -> StatFs:
        if self._pseudo_node(ino) is not None:
            return StatFs()
        with self.entered(ino) as (fs, inner):
            return fs.statfs(inner)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """A filesystem without xattrs answers ENOSYS, and the kernel then never sends GETXATTR
        on this connection again: right for one image mounted at "/", wrong for one image of a
        shared daemon, where it would hide the xattrs of all the others. There it becomes
        ENODATA, which is true of every name: the kernel caches it as "no ACL" (EOPNOTSUPP
        would fail its permission checks), and an LSM labelling inodes from security.* xattrs
        falls back to its default label (EOPNOTSUPP makes SELinux refuse the inode)."""
        if self._pseudo_node(ino) is not None:
            raise FuseError(errno.ENODATA)
        e = self.entered(ino)
        with e as (fs, inner):
            try:
                return fs.getxattr(inner, name)
            except OSError as err:
                if err.errno != errno.ENOSYS or not e.slot.base:
                    raise
        raise FuseError(errno.ENODATA)

    def listxattr(self, ino: int) -> list[bytes]:
        """Like getxattr: ENOSYS from one image of a shared daemon is "no xattrs here"."""
        if self._pseudo_node(ino) is not None:
            return []
        e = self.entered(ino)
        with e as (fs, inner):
            try:
                return fs.listxattr(inner)
            except OSError as err:
                if err.errno != errno.ENOSYS or not e.slot.base:
                    raise
        return []

    def access(self, ino: int, mask: int, uid: int, gid: int) -> None:
        if self._pseudo_node(ino) is not None:
            return
        with self.entered(ino) as (fs, inner):
            fs.access(inner, mask, uid, gid)

    def lseek(self, ino: int, fh: int, offset: int, whence: int) -> int:
        if self._pseudo_node(ino) is not None:
            raise FuseError(errno.EINVAL)
        with self.entered(ino) as (fs, inner):
            return fs.lseek(inner, fh, offset, whence)


__all__ = ["INO_MASK", "INO_SHIFT", "MAX_INDEX", "ROOT_ID", "Vfs", "VfsError", "normalize_path"]
