"""What every RAFS reader exposes, independent of the on-disk version.

Readers work straight from an mmap of the bootstrap and decode on demand: the values below are
small tuples made per call, never a Python object per inode or chunk kept for the whole image.
Inode numbers are the image's own (v5: i_ino; v6: nid); mapping the root to FUSE's 1 is the
filesystem layer's job.
"""

import mmap
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .constants import BlobFeatures, ChunkFlags, Compressor, Digester, SuperFlags


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One data blob the image references (v5 blob table + extended table, or v6 blob table)."""

    index: int
    blob_id: str
    compressor: Compressor
    digester: Digester
    chunk_size: int
    chunk_count: int = 0
    features: BlobFeatures = BlobFeatures(0)
    compressed_size: int = 0
    uncompressed_size: int = 0
    readahead_offset: int = 0
    readahead_size: int = 0
    # v6 blob.meta / ToC location inside the blob file (0 when absent)
    ci_compressor: Compressor = Compressor.NONE
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    blob_toc_size: int = 0
    blob_toc_digest: bytes = b"\0" * 32


_COMPRESSED = int(ChunkFlags.COMPRESSED)


class ChunkInfo(NamedTuple):
    """One chunk of file data: where it is in its blob and what it must hash to."""

    digest: bytes
    blob_index: int
    flags: ChunkFlags
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    file_offset: int
    index: int  # type: ignore[assignment]  # the record field shadows tuple.index
    crc32: int

    @property
    def compressed(self) -> bool:
        return bool(int(self.flags) & _COMPRESSED)  # (int &: IntFlag's own & is Python code)


class Attr(NamedTuple):
    """stat(2) fields of one inode, as the image records them."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    mtime: int
    mtime_nsec: int


class DirEntry(NamedTuple):
    """A directory entry: name, inode number, and the S_IFMT bits of the target's mode."""

    name: bytes
    ino: int
    type: int


class RafsImage(ABC):
    """A mounted-in-memory view of one bootstrap (v5 or v6)."""

    version: int
    flags: SuperFlags
    chunk_size: int
    blobs: Sequence[BlobInfo]
    root_ino: int

    @property
    def compressor(self) -> Compressor:
        return self.flags.compressor

    @property
    def digester(self) -> Digester:
        return self.flags.digester

    @property
    def has_xattrs(self) -> bool:
        return bool(self.flags & SuperFlags.HAS_XATTR)

    @abstractmethod
    def inode_count(self) -> int:
        """Number of distinct inodes (hard links counted once)."""

    @abstractmethod
    def superblock_inodes(self) -> int:
        """The superblock's inode count, parsed at open: what statfs and the backend API report
        (nydusd reports the same field). Never walks the tree, so a damaged inode cannot fail it."""

    @abstractmethod
    def getattr(self, ino: int) -> Attr:
        """Attributes of `ino`; FormatError if it is not a valid inode of this image."""

    def mode(self, ino: int) -> int:
        """st_mode of `ino` (what a type check needs, without the rest of getattr)."""
        return self.getattr(ino).mode

    @abstractmethod
    def lookup(self, parent: int, name: bytes) -> int | None:
        """Inode of `name` in directory `parent`, or None. Never matches '.' or '..'."""

    def lookup_attr(self, parent: int, name: bytes) -> Attr | None:
        """`getattr` of `lookup(parent, name)` (one LOOKUP's work); None when there is no such
        child or `parent` is not a directory (the caller's slower path tells which)."""
        if not stat.S_ISDIR(self.mode(parent)):
            return None
        ino = self.lookup(parent, name)
        return None if ino is None else self.getattr(ino)

    @abstractmethod
    def readdir(self, ino: int, offset: int = 0) -> Iterator[DirEntry]:
        """Children of directory `ino` in on-disk (byte) order, skipping the first `offset`.

        '.' and '..' are not included; the filesystem layer adds them.
        """

    def listing(self, ino: int, limit: int) -> list[tuple[bytes, int, int, Attr]] | None:
        """(name, inode, S_IFMT, attributes) of each child of directory `ino`, as `readdir` and
        `getattr` give them (and check them); None when it has more than `limit` children."""
        out: list[tuple[bytes, int, int, Attr]] = []
        for e in self.readdir(ino):
            if len(out) == limit:
                return None
            out.append((e.name, e.ino, e.type, self.getattr(e.ino)))
        return out

    @abstractmethod
    def parent(self, ino: int) -> int:
        """Parent directory inode of directory `ino` (the root is its own parent)."""

    @abstractmethod
    def readlink(self, ino: int) -> bytes:
        """Symlink target; FormatError if `ino` is not a symlink."""

    @abstractmethod
    def listxattr(self, ino: int) -> list[bytes]:
        """Full xattr names (with prefix) of `ino`."""

    @abstractmethod
    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        """Value of xattr `name`, or None when absent."""

    @abstractmethod
    def chunks(self, ino: int, offset: int = 0, size: int | None = None) -> list[ChunkInfo]:
        """Chunks of regular file `ino` that overlap [offset, offset+size), in file order.

        `ChunkInfo.file_offset` is the chunk's position in this file. Holes (ranges without a
        chunk) read as zeros.
        """

    def chunks_after(self, chunk: ChunkInfo) -> Iterator[ChunkInfo]:
        """Chunks stored after `chunk` in its blob, in blob order (whatever file they belong to),
        for read amplification across files; `file_offset` is meaningless. Images without a
        blob-wide chunk table yield nothing."""
        return iter(())

    @abstractmethod
    def prefetch_table(self) -> list[int]:
        """Inodes the image asks to prefetch (directories mean whole subtrees)."""

    @abstractmethod
    def close(self) -> None:
        """Release the mmap; the image must not be used afterwards."""

    def trim(self) -> bool:
        """Unmap the bootstrap's resident pages from this process (MADV_DONTNEED), for an idle
        mount: a walked image otherwise keeps its whole bootstrap in the daemon's RSS. They come
        back from the page cache on the next access (a minor fault per page); other readers
        are not affected. False when the image is not an open mmap."""
        buf = getattr(self, "_buf", None)
        if not isinstance(buf, mmap.mmap) or buf.closed:
            return False
        try:
            buf.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # (closed meanwhile)
            return False
        return True

    def walk(self, ino: int | None = None, path: bytes = b"/") -> Iterator[tuple[bytes, int]]:
        """Depth-first pre-order (path, inode) of the tree, children in byte order.

        Iterative with an explicit stack so a hostile deep tree cannot blow the recursion limit;
        directories already on the stack are refused (loops are a FormatError).
        """
        import stat

        from .errors import FormatError

        start = self.root_ino if ino is None else ino
        stack: list[tuple[bytes, int, tuple[int, ...]]] = [(path, start, ())]
        while stack:
            p, i, ancestors = stack.pop()
            yield p, i
            if not stat.S_ISDIR(self.getattr(i).mode):
                continue
            if i in ancestors:
                raise FormatError(f"directory loop at inode {i} ({p!r})")
            chain = (*ancestors, i)
            kids = list(self.readdir(i))
            base = p if p.endswith(b"/") else p + b"/"
            for e in reversed(kids):
                stack.append((base + e.name, e.ino, chain))

    def __enter__(self) -> "RafsImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
