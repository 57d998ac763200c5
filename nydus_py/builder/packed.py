"""The packed build tree: one row of `array` columns per directory entry, no Python object per
entry for the life of a layer (issue 16, item 10).

An entry is an index. Its attributes are columns (mode, uid, gid, mtime, mtime_nsec, size,
parent, name offset/length into one `names` bytearray, xattrs as an offset/length into one
`extra` bytearray) plus a data descriptor (`kind`, `a`, `b`):

    K_NONE     directories, fifos, sockets; devices keep rdev in `a`
    K_TAR      a regular file's bytes: `backings[bset].open_range(a, size)` (a layer tar: a is
               the member's data offset; a rewritten image: a is the inode number)
    K_CHUNKS   a regular file's packed chunk records chunks[a:a+b], blobs `blob_sets[bset]`
    K_EXTERN   a regular file whose data is `externs[a]` (a `FileData` of a directory source or
               a hand-built tree: one object per such file, kept by its source)
    K_SYMLINK  a symlink target extra[a:a+b]
    K_LINK     a hard link: the entry `a` (never itself a link) holds the inode's attributes
    K_PATH     a regular file of a directory source, read from the path extra[a:a+b]

Names are found through an open-addressing hash table of entry indexes (`array('q')`) while a
tree is edited (sources, merges); `freeze()` lets it go. A replaced or removed entry gets
parent DEAD; a hard link may still point at it (its attributes stay valid), and entries under a
dead directory are simply never reached from the root. Writers get each directory's children in
byte order of names from `children()`, computed when asked (counting sort by parent, then one
sort per directory), never stored per entry.

`Node` is a read-only view of one entry with the attributes of the old `Inode` model, made on
access for tests and the CLI; nothing keeps one.
"""

import stat
from array import array
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO, Protocol

from ..rafs.errors import FormatError
from ..rafs.layout_common import unpack_chunks
from ..rafs.model import BlobInfo
from . import plan_common
from .tree import NO_XATTRS, ChunkedData, FileData, FileKind, Inode

DEAD = -1
K_NONE, K_TAR, K_CHUNKS, K_EXTERN, K_SYMLINK, K_LINK, K_PATH = range(7)
_XHEAD = 6  # per xattr in `extra`: u16 name length, u32 value length (LE), then name, value


class Backing(Protocol):
    """Where K_TAR entries' bytes live (a layer tar, kept open while the tree is)."""

    def open_range(self, offset: int, size: int) -> BinaryIO:
        """A fresh stream of `size` bytes at `offset` of the backing file."""


class Tree:
    """A build tree in columns; entry 0 is the root directory."""

    __slots__ = (
        "mode",
        "uid",
        "gid",
        "mtime",
        "nsec",
        "size",
        "parent",
        "name_off",
        "name_len",
        "kind",
        "a",
        "b",
        "xoff",
        "xlen",
        "bset",
        "names",
        "extra",
        "chunks",
        "blob_sets",
        "externs",
        "backings",
        "_bset_of",
        "_ns",
        "_ns_fill",
        "__weakref__",
    )

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Back to an empty tree (a root directory only)."""
        self.mode = array("I")
        self.uid = array("I")
        self.gid = array("I")
        self.mtime = array("Q")
        self.nsec = array("I")
        self.size = array("Q")
        self.parent = array("i")
        self.name_off = array("Q")
        self.name_len = array("H")
        self.kind = array("B")
        self.a = array("q")
        self.b = array("q")
        self.xoff = array("Q")
        self.xlen = array("I")
        self.bset = array("H")
        self.names = bytearray()
        self.extra = bytearray()
        self.chunks = bytearray()
        self.blob_sets: list[list[BlobInfo]] = []
        self._bset_of: dict[int, int] = {}  # id(blob list) -> its index (the lists are kept)
        self.externs: list[Any] = []
        self.backings: list[Backing] = []
        self._ns: array[int] | None = array("q", bytes(8 * 64))
        self._ns_fill = 0
        self._append(0, b"", stat.S_IFDIR | 0o755, 0, 0, 0, 0, NO_XATTRS)

    def __len__(self) -> int:
        return len(self.mode)

    # -- building -------------------------------------------------------------------------------

    def _append(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, mtime: int, nsec: int, xattrs: Mapping[bytes, bytes]
    ) -> int:
        idx = len(self.mode)
        try:
            self.mode.append(mode)
            self.uid.append(uid)
            self.gid.append(gid)
            self.mtime.append(mtime)
            self.nsec.append(nsec)
        except (OverflowError, TypeError) as e:
            del self.mode[idx:], self.uid[idx:], self.gid[idx:], self.mtime[idx:], self.nsec[idx:]
            raise FormatError(f"{name!r}: attribute out of range: {e}") from None
        self.size.append(0)
        self.parent.append(parent)
        self.name_off.append(len(self.names))
        self.name_len.append(len(name))
        self.names += name
        self.kind.append(K_NONE)
        self.a.append(0)
        self.b.append(0)
        self.bset.append(0)
        self.xoff.append(0)
        self.xlen.append(0)
        if xattrs:
            self.set_xattrs(idx, xattrs)
        return idx

    def add(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        mtime: int = 0,
        nsec: int = 0,
        xattrs: Mapping[bytes, bytes] = NO_XATTRS,
    ) -> int:
        """A new entry `name` in directory `parent`, replacing any entry of that name there."""
        idx = self._append(parent, name, mode, uid, gid, mtime, nsec, xattrs)
        self._place(parent, name, idx)
        return idx

    def add_link(self, parent: int, name: bytes, target: int) -> int:
        """A hard link `name` in `parent` to the inode of entry `target`."""
        t = self.resolve(target)
        if stat.S_ISDIR(self.mode[t]):
            raise FormatError(f"{name!r}: directory linked twice (hard-linked dir or loop)")
        idx = self._append(parent, name, self.mode[t], 0, 0, 0, 0, NO_XATTRS)
        self.kind[idx], self.a[idx] = K_LINK, t
        self._place(parent, name, idx)
        return idx

    def set_attrs(
        self, idx: int, mode: int, uid: int, gid: int, mtime: int, nsec: int, xattrs: Mapping[bytes, bytes]
    ) -> None:
        self.mode[idx], self.uid[idx], self.gid[idx] = mode, uid, gid
        self.mtime[idx], self.nsec[idx] = mtime, nsec
        self.set_xattrs(idx, xattrs)

    def copy_attrs(self, idx: int, src: "Tree", s: int) -> None:
        """Mode, owner, mtime and xattrs of `src`'s entry `s` onto entry `idx`."""
        self.mode[idx], self.uid[idx], self.gid[idx] = src.mode[s], src.uid[s], src.gid[s]
        self.mtime[idx], self.nsec[idx] = src.mtime[s], src.nsec[s]
        if src is self:
            self.xoff[idx], self.xlen[idx] = self.xoff[s], self.xlen[s]
        elif src.xlen[s]:
            self.xoff[idx], self.xlen[idx] = len(self.extra), src.xlen[s]
            self.extra += src.extra[src.xoff[s] : src.xoff[s] + src.xlen[s]]
        else:
            self.xoff[idx] = self.xlen[idx] = 0

    def set_xattrs(self, idx: int, xattrs: Mapping[bytes, bytes]) -> None:
        if not xattrs:
            self.xoff[idx] = self.xlen[idx] = 0
            return
        start = len(self.extra)
        try:
            for name in sorted(xattrs):
                value = xattrs[name]
                head = len(name).to_bytes(2, "little") + len(value).to_bytes(4, "little")
                self.extra += head + name + value
        except (TypeError, OverflowError) as e:
            del self.extra[start:]
            raise FormatError(f"{self.name(idx)!r}: bad xattr: {e}") from None
        self.xoff[idx], self.xlen[idx] = start, len(self.extra) - start

    def set_symlink(self, idx: int, target: bytes) -> None:
        self.kind[idx], self.a[idx], self.b[idx] = K_SYMLINK, len(self.extra), len(target)
        self.extra += target
        self.size[idx] = len(target)

    def set_rdev(self, idx: int, rdev: int) -> None:
        self.kind[idx], self.a[idx] = K_NONE, rdev

    def set_tar(self, idx: int, offset: int, size: int, backing: int = 0) -> None:
        self.kind[idx], self.a[idx], self.b[idx], self.size[idx] = K_TAR, offset, 0, size
        self.bset[idx] = backing

    def copy_entry(self, parent: int, name: bytes, src: "Tree", s: int) -> int:
        """A copy of `src`'s non-directory inode `s` (attributes and data) as `name` in `parent`."""
        idx = self.add(parent, name, 0)
        self.copy_attrs(idx, src, s)
        k = src.kind[s]
        a, b, size = src.a[s], src.b[s], src.size[s]
        if k == K_TAR:
            bk = src.backings[src.bset[s]]
            pos = next((i for i, x in enumerate(self.backings) if x is bk), -1)
            if pos < 0:
                self.backings.append(bk)
                pos = len(self.backings) - 1
            self.set_tar(idx, a, size, pos)
        elif k == K_CHUNKS:
            self.set_chunks(idx, memoryview(src.chunks)[a : a + b], size, self.blob_set(src.blob_sets[src.bset[s]]))
        elif k == K_EXTERN:
            self.set_extern(idx, src.externs[a], size)
        elif k == K_PATH:
            self.set_path(idx, bytes(src.extra[a : a + b]), size)
        elif k == K_SYMLINK:
            self.set_symlink(idx, bytes(src.extra[a : a + b]))
        elif k == K_NONE:
            self.a[idx] = a
        return idx

    def set_extern(self, idx: int, data: Any, size: int) -> None:
        self.kind[idx], self.a[idx], self.size[idx] = K_EXTERN, len(self.externs), size
        self.externs.append(data)

    def set_path(self, idx: int, path: bytes, size: int) -> None:
        self.kind[idx], self.a[idx], self.b[idx], self.size[idx] = K_PATH, len(self.extra), len(path), size
        self.extra += path

    def blob_set(self, blobs: list[BlobInfo]) -> int:
        """Index of `blobs` (by identity) in `blob_sets`, added if new."""
        got = self._bset_of.get(id(blobs))
        if got is not None:
            return got
        if len(self.blob_sets) > 0xFFFF:
            raise FormatError("more than 65536 distinct blob tables in one tree")
        self.blob_sets.append(blobs)
        self._bset_of[id(blobs)] = len(self.blob_sets) - 1
        return len(self.blob_sets) - 1

    def set_chunks(self, idx: int, packed: "bytes | bytearray | memoryview", size: int, bset: int) -> None:
        self.kind[idx], self.a[idx], self.b[idx] = K_CHUNKS, len(self.chunks), len(packed)
        self.chunks += packed
        self.size[idx], self.bset[idx] = size, bset

    # -- namespace --------------------------------------------------------------------------------

    def _name_is(self, j: int, name: bytes) -> bool:
        n = len(name)
        if self.name_len[j] != n:
            return False
        o = self.name_off[j]
        return self.names[o : o + n] == name

    def _find(self, parent: int, name: bytes) -> tuple[int, int]:
        """(slot for the key, entry there or -1)."""
        ns = self._ensure_ns()
        mask = len(ns) - 1
        h = hash((parent, name)) & mask
        free = -1
        while True:
            v = ns[h]
            if v == 0:
                return (free if free >= 0 else h), -1
            if v > 0:
                j = v - 1
                if self.parent[j] == parent and self._name_is(j, name):
                    return h, j
            elif free < 0:
                free = h
            h = (h + 1) & mask

    def _ensure_ns(self) -> "array[int]":
        ns = self._ns
        if ns is None or (self._ns_fill + 1) * 2 > len(ns):
            ns = self._rebuild_ns()
        return ns

    def reserve(self, n: int) -> None:
        """Room in the name index for `n` more entries, made at once: no rebuild while they are
        added (it grows by half each time otherwise: a tree built name by name rehashes every
        entry about three times over)."""
        ns = self._ns
        if ns is None or (self._ns_fill + n + 1) * 2 > len(ns):
            self._rebuild_ns(n)

    def _rebuild_ns(self, extra: int = 0) -> "array[int]":
        live = sum(1 for p in self.parent if p != DEAD)
        cap = 64
        while cap < 3 * (live + extra):
            cap *= 2
        self._ns = ns = array("q", bytes(8 * cap))
        self._ns_fill = 0
        mask = cap - 1
        parent, names, off, ln = self.parent, self.names, self.name_off, self.name_len
        for j in range(1, len(parent)):
            p = parent[j]
            if p == DEAD:
                continue
            h = hash((p, bytes(names[off[j] : off[j] + ln[j]]))) & mask
            while ns[h]:
                h = (h + 1) & mask
            ns[h] = j + 1
            self._ns_fill += 1
        return ns

    def _place(self, parent: int, name: bytes, idx: int) -> None:
        slot, old = self._find(parent, name)
        assert self._ns is not None
        if old == idx:  # the index was rebuilt while looking: it holds `idx` already
            return
        if old >= 0:
            self.parent[old] = DEAD
        elif self._ns[slot] == 0:
            self._ns_fill += 1
        self._ns[slot] = idx + 1

    def lookup(self, parent: int, name: bytes) -> int:
        """The entry `name` in directory `parent`, or -1."""
        return self._find(parent, name)[1]

    def remove(self, parent: int, name: bytes) -> None:
        slot, old = self._find(parent, name)
        if old >= 0:
            assert self._ns is not None
            self.parent[old] = DEAD
            self._ns[slot] = -1

    def freeze(self) -> None:
        """Done editing: let the name index go (rebuilt if `lookup` is called again)."""
        self._ns = None
        self._ns_fill = 0

    # -- reading ----------------------------------------------------------------------------------

    def resolve(self, idx: int) -> int:
        """The entry holding `idx`'s inode attributes (itself unless a hard link)."""
        return self.a[idx] if self.kind[idx] == K_LINK else idx

    def name(self, idx: int) -> bytes:
        o = self.name_off[idx]
        return bytes(self.names[o : o + self.name_len[idx]])

    def is_dir(self, idx: int) -> bool:
        return stat.S_ISDIR(self.mode[self.resolve(idx)])

    def xattrs(self, idx: int) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        pos, end = self.xoff[idx], self.xoff[idx] + self.xlen[idx]
        extra = self.extra
        while pos < end:
            nl = int.from_bytes(extra[pos : pos + 2], "little")
            vl = int.from_bytes(extra[pos + 2 : pos + _XHEAD], "little")
            pos += _XHEAD
            out[bytes(extra[pos : pos + nl])] = bytes(extra[pos + nl : pos + nl + vl])
            pos += nl + vl
        return out

    def symlink(self, idx: int) -> bytes:
        a = self.a[idx]
        return bytes(self.extra[a : a + self.b[idx]]) if self.kind[idx] == K_SYMLINK else b""

    def rdev(self, idx: int) -> int:
        fmt = stat.S_IFMT(self.mode[idx])
        return self.a[idx] if fmt in (stat.S_IFCHR, stat.S_IFBLK) and self.kind[idx] == K_NONE else 0

    def has_new_data(self, idx: int) -> bool:
        """A regular file whose bytes are still to be written into a blob."""
        return self.kind[idx] in (K_TAR, K_EXTERN, K_PATH)

    def file_data(self, idx: int) -> FileData | None:
        """A transient `FileData` for a K_TAR / K_EXTERN file."""
        k = self.kind[idx]
        if k == K_TAR:
            bk = self.backings[self.bset[idx]]
            return FileData(size=self.size[idx], open=_RangeOpener(bk, self.a[idx], self.size[idx]))
        if k == K_PATH:
            a = self.a[idx]
            return FileData(size=self.size[idx], open=_PathOpener(bytes(self.extra[a : a + self.b[idx]])))
        if k == K_EXTERN:
            data = self.externs[self.a[idx]]
            return data if isinstance(data, FileData) else None
        return None

    def extern(self, idx: int) -> Any:
        return self.externs[self.a[idx]] if self.kind[idx] == K_EXTERN else None

    def chunk_bytes(self, idx: int) -> bytes:
        if self.kind[idx] != K_CHUNKS:
            return b""
        a = self.a[idx]
        return bytes(self.chunks[a : a + self.b[idx]])

    def blobs_of(self, idx: int) -> list[BlobInfo]:
        return self.blob_sets[self.bset[idx]]

    def path(self, idx: int) -> bytes:
        parts: list[bytes] = []
        guard = 0
        while idx > 0 and guard <= len(self.mode):
            parts.append(self.name(idx))
            idx = self.parent[idx]
            guard += 1
        return b"/" + b"/".join(reversed(parts))

    def children(self) -> "Children":
        return Children(self)

    def walk(self, start: int = 0, path: bytes = b"/") -> Iterator[tuple[bytes, int]]:
        """Depth-first pre-order (path, entry), children in byte order."""
        ch = self.children()
        stack: list[tuple[bytes, int]] = [(path, start)]
        while stack:
            p, i = stack.pop()
            yield p, i
            if self.kind[i] != K_LINK and stat.S_ISDIR(self.mode[i]):
                base = p if p.endswith(b"/") else p + b"/"
                for c in reversed(ch.of(i)):
                    stack.append((base + self.name(c), c))

    def walk_nodes(self, path: bytes = b"/") -> Iterator[tuple[bytes, "Node"]]:
        """`walk` with transient `Node` views (`tree.walk` of a packed tree)."""
        for p, i in self.walk(0, path):
            yield p, Node(self, i)

    def find(self, path: bytes) -> int:
        """The entry at absolute `path`, or -1 (walks the name index)."""
        node = 0
        for comp in path.split(b"/"):
            if not comp or comp == b".":
                continue
            if not self.is_dir(node):
                return -1
            node = self.lookup(self.resolve(node), comp)
            if node < 0:
                return -1
        return node

    @property
    def root(self) -> "Node":
        return Node(self, 0)


class Children:
    """Each directory's live children in byte order of name, as two arrays (`first[d]` ..
    `first[d+1]` index `kids`); made when a writer asks, dropped with it."""

    __slots__ = ("first", "kids")

    def __init__(self, tree: Tree) -> None:
        n = len(tree)
        parent = tree.parent
        first = array("I", bytes(4 * (n + 1)))
        for i in range(1, n):
            p = parent[i]
            if p != DEAD:
                first[p + 1] += 1
        for d in range(n):
            first[d + 1] += first[d]
        kids = array("i", bytes(4 * first[n]))
        fill = array("I", first)
        for i in range(1, n):
            p = parent[i]
            if p != DEAD:
                kids[fill[p]] = i
                fill[p] += 1
        del fill
        name = tree.name
        for d in range(n):
            s, e = first[d], first[d + 1]
            if e - s > 1:
                kids[s:e] = array("i", sorted(kids[s:e], key=name))
        self.first, self.kids = first, kids

    def of(self, d: int) -> "array[int]":
        return self.kids[self.first[d] : self.first[d + 1]]

    def count(self, d: int) -> int:
        return self.first[d + 1] - self.first[d]


class _RangeOpener:
    """`FileData.open` of a K_TAR entry (made on demand, not kept per file)."""

    __slots__ = ("backing", "offset", "size")

    def __init__(self, backing: Backing, offset: int, size: int) -> None:
        self.backing, self.offset, self.size = backing, offset, size

    def __call__(self) -> BinaryIO:
        return self.backing.open_range(self.offset, self.size)


class _PathOpener:
    """`FileData.open` of a K_PATH entry (made on demand, not kept per file)."""

    __slots__ = ("path",)

    def __init__(self, path: bytes) -> None:
        self.path = path

    def __call__(self) -> BinaryIO:
        return open(self.path, "rb")


class Node(FileKind):
    """Read-only view of one entry with the old `Inode` attributes (made on access, not kept)."""

    __slots__ = ("tree", "index", "ident", "mode")

    def __init__(self, tree: Tree, index: int) -> None:
        self.tree = tree
        self.index = index
        self.ident = tree.resolve(index)  # same for every name of a hard-linked inode
        self.mode = tree.mode[self.ident]

    @property
    def uid(self) -> int:
        return self.tree.uid[self.ident]

    @property
    def gid(self) -> int:
        return self.tree.gid[self.ident]

    @property
    def mtime(self) -> int:
        return self.tree.mtime[self.ident]

    @property
    def mtime_nsec(self) -> int:
        return self.tree.nsec[self.ident]

    @property
    def rdev(self) -> int:
        return self.tree.rdev(self.ident)

    @property
    def xattrs(self) -> Mapping[bytes, bytes]:
        return self.tree.xattrs(self.ident) or NO_XATTRS

    @property
    def symlink(self) -> bytes | None:
        return self.tree.symlink(self.ident) if self.is_symlink else None

    @property
    def data(self) -> FileData | ChunkedData | None:
        t, i = self.tree, self.ident
        if not self.is_reg:
            return None
        if t.kind[i] == K_CHUNKS:
            return ChunkedData(size=t.size[i], chunks=t.chunk_bytes(i), blobs=t.blobs_of(i))
        ext = t.extern(i)
        if ext is not None:
            return ext
        return t.file_data(i)

    @property
    def children(self) -> dict[bytes, "Node"] | None:
        if not self.is_dir:
            return None
        t = self.tree
        return {t.name(c): Node(t, c) for c in t.children().of(self.ident)}

    @property
    def size(self) -> int:
        return self.tree.size[self.ident] if self.is_reg or self.is_symlink else 0

    def walk_nodes(self, path: bytes = b"/") -> Iterator[tuple[bytes, "Node"]]:
        for p, i in self.tree.walk(self.index, path):
            yield p, Node(self.tree, i)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Node) and other.tree is self.tree and other.ident == self.ident

    def __hash__(self) -> int:
        return hash((id(self.tree), self.ident))


# --------------------------------------------------------------------------------------------
# Inode trees (hand-built, directory and bootstrap sources) -> packed
# --------------------------------------------------------------------------------------------


def from_inode(root: Inode, check: Callable[[bytes, Inode], None] | None = None) -> Tree:
    """Pack an `Inode` tree (hard links = one object under several names, any type). Entries are
    added in BFS order with names in byte order. FormatError for what a packed tree cannot hold:
    non-bytes names, a directory named twice, children under a non-directory, unknown data."""
    if not isinstance(root, Inode) or not root.is_dir:
        raise FormatError("the root of the tree must be a directory")
    tree = Tree()
    first: dict[int, int] = {}  # id(non-directory Inode) -> its entry (only while packing)
    seen_dirs = {id(root)}
    _pack_attrs(tree, 0, root, b"/")
    queue: list[tuple[int, Inode, bytes]] = [(0, root, b"/")]
    while queue:
        nxt: list[tuple[int, Inode, bytes]] = []
        for d, node, path in queue:
            kids = node.children or {}
            for name in kids:
                plan_common.check_name(name, path)
            for name in sorted(kids):
                child = kids[name]
                cpath = plan_common.join(path, name)
                if not isinstance(child, Inode):
                    raise FormatError(f"{cpath!r}: not an Inode")
                if check is not None:
                    check(cpath, child)
                prev = first.get(id(child))
                if prev is not None:
                    tree.add_link(d, name, prev)
                    continue
                if child.is_dir:
                    if id(child) in seen_dirs:
                        raise FormatError(f"{cpath!r}: directory linked twice (hard-linked dir or loop)")
                    seen_dirs.add(id(child))
                elif child.children:
                    raise FormatError(f"{cpath!r}: only directories can have children")
                idx = tree.add(d, name, 0)
                _pack_attrs(tree, idx, child, cpath)
                if child.is_dir:
                    nxt.append((idx, child, cpath))
                else:
                    first[id(child)] = idx
        queue = nxt
    tree.freeze()
    return tree


def _pack_attrs(tree: Tree, idx: int, node: Inode, path: bytes) -> None:
    plan_common.check_attrs(path, node)
    mode = node.mode
    if not isinstance(mode, int) or not 0 <= mode <= 0xFFFF_FFFF:
        raise FormatError(f"{path!r}: unsupported file type in mode {mode!r}")
    if not isinstance(node.xattrs, Mapping):
        raise FormatError(f"{path!r}: xattrs must be a mapping")
    for k, v in node.xattrs.items():
        if not isinstance(k, bytes) or not isinstance(v, bytes):
            raise FormatError(f"{path!r}: xattr names and values must be bytes")
    try:
        tree.set_attrs(idx, mode, node.uid, node.gid, node.mtime, node.mtime_nsec, node.xattrs)
    except (OverflowError, TypeError) as e:
        raise FormatError(f"{path!r}: attribute out of range: {e}") from None
    fmt = stat.S_IFMT(mode)
    if fmt == stat.S_IFLNK:
        target = node.symlink
        if not isinstance(target, bytes):
            raise FormatError(f"{path!r}: symlink target must be 1..4095 bytes without NUL")
        tree.set_symlink(idx, target)
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        rdev = node.rdev
        if not isinstance(rdev, int) or not 0 <= rdev < 1 << 63:
            raise FormatError(f"{path!r}: device number {rdev!r} does not fit v5's 32-bit i_rdev")
        tree.set_rdev(idx, rdev)
    elif fmt == stat.S_IFREG:
        data = node.data
        if data is None:
            return
        size = data.size
        if not isinstance(size, int) or not 0 <= size < 1 << 64:
            raise FormatError(f"{path!r}: bad file size {size!r}")
        if isinstance(data, ChunkedData):
            tree.set_chunks(idx, data.chunks, size, tree.blob_set(data.blobs))
        elif isinstance(data, FileData):
            tree.set_extern(idx, data, size)
        else:
            raise FormatError(f"{path!r}: file data of unknown kind {type(data).__name__}")


def as_tree(root: "Inode | Tree | Node") -> Tree:
    """`root` itself if packed (or the tree of a root `Node` view), else packed from its
    `Inode` form."""
    if isinstance(root, Tree):
        return root
    if isinstance(root, Node):
        if root.index != 0:
            raise FormatError("the root of the tree must be a directory")
        return root.tree
    return from_inode(root)


def chunk_infos(tree: Tree, idx: int) -> list[Any]:
    return unpack_chunks(tree.chunk_bytes(idx))
