"""The object form of a build tree (`Inode`), and the file data kinds (`FileData`, `ChunkedData`).

Sources (directory, tar, bootstrap), layer merging and the writers work on the packed form,
`packed.Tree` (array columns, no Python object per entry: issue 16, item 10); an `Inode` tree is
what a caller builds by hand (tests, small tools) and is packed when a build or merge starts
(`packed.as_tree`). `walk` and `link_counts` take either form; packed entries come out as
transient `packed.Node` views with the same attributes.

Hard links are the same `Inode` object reachable under several names; writers count references
for `nlink` and emit one inode (v6) or linked records (v5). An inode without xattrs shares
`NO_XATTRS` (read-only: assign a new mapping to change xattrs, never mutate one in place).
"""

import stat
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, BinaryIO

from ..rafs.errors import FormatError
from ..rafs.layout_common import pack_chunks, unpack_chunks
from ..rafs.model import BlobInfo, ChunkInfo

NO_XATTRS: Mapping[bytes, bytes] = MappingProxyType({})


@dataclass(slots=True)
class FileData:
    """Content not yet in any blob: `size` bytes read from `open()` (a fresh stream each call)."""

    size: int
    open: Callable[[], BinaryIO]


@dataclass(slots=True)
class ChunkedData:
    """Content already stored in existing blobs (from a bootstrap being merged, or a layer
    converted before).

    `chunks` is the file's chunk list as packed 80-byte records (`rafs.layout_common.CHUNK`, the
    v5 on-disk form), each with `file_offset` in this file and `blob_index` into `blobs`: one
    bytes object per file instead of a `ChunkInfo` per chunk (issue 16, item 10). A sequence of
    `ChunkInfo` given instead is packed here; `chunk_infos()` decodes them again.
    """

    size: int
    chunks: bytes
    blobs: list[BlobInfo]

    def __post_init__(self) -> None:
        if not isinstance(self.chunks, bytes):
            self.chunks = _pack(self.chunks)

    def chunk_infos(self) -> list[ChunkInfo]:
        return unpack_chunks(self.chunks)


def _pack(chunks: "bytearray | memoryview | Sequence[ChunkInfo]") -> bytes:
    if isinstance(chunks, bytearray | memoryview):
        return bytes(chunks)
    for c in chunks:
        if len(c.digest) != 32:  # "32s" would pad or cut it silently
            raise FormatError(f"chunk at file offset {c.file_offset} has a {len(c.digest)}-byte digest")
    try:
        return pack_chunks(chunks)
    except struct.error as e:
        raise FormatError(f"chunk field out of range: {e}") from None


class FileKind:
    """`is_dir` / `is_reg` / `is_symlink` from a `mode` (an `Inode`, or a packed tree's `Node`)."""

    __slots__ = ()
    mode: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(eq=False, slots=True)
class Inode(FileKind):
    """One file system object. Directories hold `children`, sorted by the writers."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    rdev: int = 0
    xattrs: Mapping[bytes, bytes] = field(default_factory=lambda: NO_XATTRS)
    symlink: bytes | None = None
    data: FileData | ChunkedData | None = None
    children: dict[bytes, "Inode"] | None = None

    @property
    def size(self) -> int:
        if self.is_reg:
            return self.data.size if self.data is not None else 0
        if self.is_symlink:
            return len(self.symlink or b"")
        return 0

    @staticmethod
    def directory(mode: int = 0o755, **kw: object) -> "Inode":
        return Inode(mode=stat.S_IFDIR | (mode & 0o7777), children={}, **kw)  # type: ignore[arg-type]


def walk(root: "Inode | Any", path: bytes = b"/") -> Iterator[tuple[bytes, Any]]:
    """Depth-first pre-order (path, inode), children in byte order (iterative). A packed
    `Tree` yields transient `packed.Node` views."""
    if not isinstance(root, Inode):  # a packed tree or a `packed.Node` view
        yield from root.walk_nodes(path)
        return
    stack: list[tuple[bytes, Inode]] = [(path, root)]
    while stack:
        p, node = stack.pop()
        yield p, node
        if node.children:
            base = p if p.endswith(b"/") else p + b"/"
            for name in sorted(node.children, reverse=True):
                stack.append((base + name, node.children[name]))


def link_counts(root: "Inode | Any") -> dict[int, int]:
    """ident(inode) -> number of directory entries naming it (directories: 2 + subdirectories)."""
    counts: dict[int, int] = {}
    for _path, node in walk(root):
        key = ident(node)
        if not node.is_dir:
            counts[key] = counts.get(key, 0) + 1
        else:
            counts[key] = 2 + sum(1 for c in (node.children or {}).values() if c.is_dir)
    return counts


def ident(node: "Inode | Any") -> int:
    """Identity of an inode for hard-link grouping: id() of an `Inode`, the inode's entry of a
    packed `Node` view."""
    return id(node) if isinstance(node, Inode) else int(node.ident)
