"""A tiny in-memory read-only filesystem for driving the FUSE handler in tests."""

import errno
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from nydus_py.fuse.abi import FOpenFlags, InitFlags
from nydus_py.fuse.api import DEFAULT_WANT, Entry, Filesystem, FuseAttr, FuseError, StatFs, negative_entry

ENTRY_TIMEOUT = 3600.0
ATTR_TIMEOUT = 2.5
MTIME = 1_700_000_000


@dataclass
class Node:
    ino: int
    mode: int
    parent: int = 1
    data: bytes = b""
    children: dict[bytes, int] = field(default_factory=dict)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


class MemFS(Filesystem):
    """/hello (file with xattrs), /link -> hello, /sub/deep, /many/* (40 files + one long name),
    plus names that make lookup fail: boom (ValueError), noerrno (OSError without errno),
    denied (PermissionError), negative (a cached negative entry)."""

    def __init__(self, want: InitFlags = DEFAULT_WANT) -> None:
        self.want = want
        self.nodes: dict[int, Node] = {}
        self.capable: list[InitFlags] = []
        self.forgets: list[tuple[int, int]] = []
        self.destroyed = 0
        self.released: list[tuple[int, int]] = []
        self.opened: list[tuple[int, int]] = []
        self.access_calls: list[tuple[int, int, int, int]] = []
        self._mk(1, stat.S_IFDIR | 0o755, parent=1)
        hello = self._mk(2, stat.S_IFREG | 0o644, data=b"hello world\n")
        hello.xattrs = {b"user.greeting": b"hi there", b"user.empty": b"", b"security.x": b"\x00\x01"}
        self._mk(3, stat.S_IFDIR | 0o755)
        self._mk(4, stat.S_IFREG | 0o600, parent=3, data=bytes(range(256)) * 40)
        self._mk(5, stat.S_IFLNK | 0o777, data=b"hello")
        self._mk(6, stat.S_IFDIR | 0o755)
        self.nodes[1].children = {b"hello": 2, b"sub": 3, b"link": 5, b"many": 6}
        self.nodes[3].children = {b"deep": 4}
        ino = 7
        for i in range(40):
            self._mk(ino, stat.S_IFREG | 0o644, parent=6, data=b"x" * i)
            self.nodes[6].children[b"f%02d" % i] = ino
            ino += 1
        self._mk(ino, stat.S_IFREG | 0o644, parent=6)
        self.nodes[6].children[b"L" * 255] = ino

    def _mk(self, ino: int, mode: int, parent: int = 1, data: bytes = b"") -> Node:
        node = Node(ino, mode, parent, data)
        self.nodes[ino] = node
        return node

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise FuseError(errno.ENOENT) from None

    def attr(self, ino: int) -> FuseAttr:
        n = self._node(ino)
        size = len(n.data)
        return FuseAttr(ino=ino, size=size, blocks=(size + 511) // 512, atime=MTIME, mtime=MTIME + ino,
                        ctime=MTIME, mtime_nsec=123_456_789, mode=n.mode,
                        nlink=2 if stat.S_ISDIR(n.mode) else 1, uid=1000, gid=100, blksize=4096)

    def entry(self, ino: int) -> Entry:
        return Entry(ino, 7, self.attr(ino), ENTRY_TIMEOUT, ATTR_TIMEOUT)

    # -- Filesystem -----------------------------------------------------------------------------
    def init(self, capable: InitFlags) -> InitFlags:
        self.capable.append(capable)
        return self.want

    def destroy(self) -> None:
        self.destroyed += 1

    def lookup(self, parent: int, name: bytes) -> Entry:
        p = self._node(parent)
        if name == b"boom":
            raise ValueError("lookup exploded")
        if name == b"noerrno":
            raise OSError("no errno here")
        if name == b"denied":
            raise PermissionError(errno.EACCES, "denied")
        if name == b"negative":
            return negative_entry(5.0)
        if not stat.S_ISDIR(p.mode):
            raise FuseError(errno.ENOTDIR)
        if name == b".":
            return self.entry(parent)
        if name == b"..":
            return self.entry(p.parent)
        child = p.children.get(name)
        if child is None:
            raise FuseError(errno.ENOENT)
        return self.entry(child)

    def forget(self, ino: int, nlookup: int) -> None:
        self.forgets.append((ino, nlookup))

    def getattr(self, ino: int) -> tuple[FuseAttr, float]:
        return self.attr(ino), ATTR_TIMEOUT

    def readlink(self, ino: int) -> bytes:
        n = self._node(ino)
        if not stat.S_ISLNK(n.mode):
            raise FuseError(errno.EINVAL)
        return n.data

    def open(self, ino: int, flags: int) -> tuple[int, int]:
        if stat.S_ISDIR(self._node(ino).mode):
            raise FuseError(errno.EISDIR)
        self.opened.append((ino, flags))
        return 100 + ino, FOpenFlags.KEEP_CACHE

    def read(self, ino: int, fh: int, offset: int, size: int) -> bytes:
        if fh != 100 + ino:
            raise FuseError(errno.EBADF)
        return self._node(ino).data[offset : offset + size]

    def release(self, ino: int, fh: int) -> None:
        self.released.append((ino, fh))

    def opendir(self, ino: int, flags: int) -> tuple[int, int]:
        if not stat.S_ISDIR(self._node(ino).mode):
            raise FuseError(errno.ENOTDIR)
        return 200 + ino, FOpenFlags.KEEP_CACHE | FOpenFlags.CACHE_DIR

    def readdir(self, ino: int, fh: int, offset: int) -> Iterator[tuple[bytes, int, int, int]]:
        n = self._node(ino)
        if not stat.S_ISDIR(n.mode):
            raise FuseError(errno.ENOTDIR)
        entries = [(b".", ino, stat.S_IFDIR), (b"..", n.parent, stat.S_IFDIR)]
        entries += [(name, c, stat.S_IFMT(self.nodes[c].mode)) for name, c in n.children.items()]
        for i in range(offset, len(entries)):
            name, child, typ = entries[i]
            yield name, child, typ, i + 1

    def releasedir(self, ino: int, fh: int) -> None:
        self.released.append((ino, fh))

    def statfs(self, ino: int) -> StatFs:
        return StatFs(blocks=1000, bfree=0, bavail=0, files=len(self.nodes), ffree=0, bsize=4096,
                      namelen=255, frsize=4096)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self._node(ino).xattrs.get(name)
        if value is None:
            raise FuseError(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self._node(ino).xattrs)

    def access(self, ino: int, mask: int, uid: int, gid: int) -> None:
        self.access_calls.append((ino, mask, uid, gid))
        if mask & 2 and uid != 0:
            raise FuseError(errno.EACCES)

    def lseek(self, ino: int, fh: int, offset: int, whence: int) -> int:
        size = len(self._node(ino).data)
        if offset >= size:
            raise FuseError(errno.ENXIO)
        return offset if whence == 3 else size  # SEEK_DATA / SEEK_HOLE
