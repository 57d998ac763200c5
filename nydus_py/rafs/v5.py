"""RAFS v5 bootstrap reader (spec: shared/specs/RAFS-FORMAT.md sections 2, 3 and 6).

Only the superblock, the blob tables and the root record are decoded at load; every other
inode, name, xattr and chunk record is read from the buffer with `struct.unpack_from` when asked
for, so opening a bootstrap with a million inodes costs the same as opening one with ten.

The buffer is untrusted: every record is range-checked and validated when touched, and any
inconsistency is one FormatError naming the inode and the problem. Directory edges are checked
both ways (a child's `i_parent` must be the directory listing it, and child slots come after the
directory's own), so what a walk sees is a real tree: no loops and no shared subtrees.
"""

import mmap
import os
import stat
from collections.abc import Iterator
from typing import NamedTuple

from . import codec
from .constants import (
    BLOB_FEATURES_INVALID,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    SUPER_FLAGS_KNOWN,
    BlobFeatures,
    ChunkFlags,
    SuperFlags,
)
from .errors import FormatError
from .layout_common import CHUNK_EXTENT, CHUNK_RECORD_SIZE, U32, U64, unpack_chunk, unpack_u32s
from .layout_v5 import (
    BLOB_ENTRY_HEAD,
    EXT_BLOB_ENTRY,
    EXT_BLOB_ENTRY_SIZE,
    INODE_BODY,
    INODE_INO_OFFSET,
    INODE_RECORD_SIZE,
    MAX_BLOB_ID,
    MAX_NAME,
    RAFS_V4_VERSION,
    RAFS_V5_MAGIC,
    RAFS_V5_SUPERBLOCK_SIZE,
    RAFS_V5_VERSION,
    ROOT_INO,
    SUPERBLOCK,
    V5_INODE_HAS_HOLE,
    V5_INODE_SYMLINK,
    V5_INODE_XATTR,
    XATTR_NAME_PREFIXES,
    XATTR_NAMES_EXACT,
    align8,
)
from .model import Attr, BlobInfo, ChunkInfo, DirEntry, RafsImage

Buffer = bytes | bytearray | mmap.mmap | memoryview

KNOWN_CHUNK_FLAGS = 0x1F
VALID_TYPES = frozenset(
    (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)
)
BLOB_FEATURES_KNOWN = sum(int(f) for f in BlobFeatures)


class _Rec(NamedTuple):
    """One validated inode record (decoded per call, never kept)."""

    slot: int
    off: int
    parent: int
    ino: int
    uid: int
    gid: int
    mode: int
    size: int
    blocks: int
    flags: int
    nlink: int
    child_index: int
    child_count: int
    name_size: int
    symlink_size: int
    rdev: int
    mtime_nsec: int
    mtime: int
    xattr_off: int  # where the xattr table would start (after name and symlink target)
    data_off: int  # where chunk records start (after the xattr table, if any)

    @property
    def ftype(self) -> int:
        return stat.S_IFMT(self.mode)


class V5Image(RafsImage):
    """A RAFS v5 bootstrap, read on demand from `buf` (mmap or bytes)."""

    version = 5
    root_ino = ROOT_INO

    def __init__(self, buf: Buffer) -> None:
        self._buf: Buffer = buf
        self._len = len(buf)
        self._closed = False
        self._unique_inodes: int | None = None
        self._unique_inodes_error: str | None = None
        self._parse_superblock()
        self.blobs: list[BlobInfo] = self._parse_blob_tables()
        root = self._record(ROOT_INO)
        if root.ino != ROOT_INO or not stat.S_ISDIR(root.mode):
            raise FormatError(
                f"inode 1 (root): slot 1 must be the root directory, found i_ino {root.ino} mode {root.mode:o}"
            )

    # ------------------------------------------------------------------ load-time tables

    def _parse_superblock(self) -> None:
        n = self._len
        if n < RAFS_V5_SUPERBLOCK_SIZE + 8:
            raise FormatError(f"v5 bootstrap too short: {n} bytes, the superblock alone is 8192")
        if n % 8:
            raise FormatError(f"v5 bootstrap length {n} is not a multiple of 8")
        (
            magic,
            version,
            sb_size,
            block_size,
            flags,
            inodes_count,
            itab_off,
            ptab_off,
            btab_off,
            itab_entries,
            ptab_entries,
            btab_size,
            ext_entries,
            ext_off,
        ) = SUPERBLOCK.unpack_from(self._buf, 0)
        if magic != RAFS_V5_MAGIC or version not in (RAFS_V5_VERSION, RAFS_V4_VERSION):
            raise FormatError(f"superblock: bad magic {magic:#x} / version {version:#x} for RAFS v5")
        if sb_size != RAFS_V5_SUPERBLOCK_SIZE:
            raise FormatError(f"superblock: s_sb_size {sb_size}, expected {RAFS_V5_SUPERBLOCK_SIZE}")
        if block_size & (block_size - 1) or not MIN_CHUNK_SIZE <= block_size <= MAX_CHUNK_SIZE:
            raise FormatError(
                f"superblock: chunk size {block_size:#x} is not a power of two in 4 KiB..16 MiB"
            )
        if flags & ~SUPER_FLAGS_KNOWN:
            raise FormatError(f"superblock: unknown flag bits {flags & ~SUPER_FLAGS_KNOWN:#x} in s_flags")
        if itab_entries == 0:
            raise FormatError("superblock: inode table is empty (no root inode)")
        if inodes_count > itab_entries:
            raise FormatError(
                f"superblock: s_inodes_count {inodes_count} exceeds inode table entries {itab_entries}"
            )
        ranges = [("inode table", itab_off, itab_entries * 4)]
        if btab_size:
            ranges.append(("blob table", btab_off, btab_size))
        if ext_entries:
            ranges.append(("extended blob table", ext_off, ext_entries * EXT_BLOB_ENTRY_SIZE))
        if ptab_entries:
            ranges.append(("prefetch table", ptab_off, ptab_entries * 4))
        for name, off, size in ranges:
            if off % 8 or off < RAFS_V5_SUPERBLOCK_SIZE or off + size > n:
                raise FormatError(
                    f"superblock: {name} [{off}, +{size}) is not 8-aligned inside the bootstrap "
                    f"[{RAFS_V5_SUPERBLOCK_SIZE}, {n})"
                )
        for i, (na, oa, sa) in enumerate(ranges):
            for nb, ob, sb in ranges[i + 1 :]:
                if oa < ob + sb and ob < oa + sa:
                    raise FormatError(f"superblock: {na} [{oa}, +{sa}) overlaps {nb} [{ob}, +{sb})")

        self.chunk_size: int = block_size
        self.flags: SuperFlags = SuperFlags(flags)
        self.inodes_count_hint = inodes_count
        self._itab = itab_off
        self._entries = itab_entries
        self._ptab = ptab_off
        self._ptab_entries = ptab_entries
        self._btab = btab_off
        self._btab_size = btab_size
        self._ext = ext_off
        self._ext_entries = ext_entries

    def _parse_blob_tables(self) -> list[BlobInfo]:
        buf = self._buf
        table = bytes(buf[self._btab : self._btab + self._btab_size])
        pos, end = 0, len(table)
        blobs: list[BlobInfo] = []
        while end - pos > 8:
            ra_off, ra_size = BLOB_ENTRY_HEAD.unpack_from(table, pos)
            nul = table.find(b"\0", pos + 8)
            id_bytes = table[pos + 8 : end if nul < 0 else nul]
            pos += 8 + len(id_bytes) + 1
            index = len(blobs)
            if not 0 < len(id_bytes) <= MAX_BLOB_ID or not all(0x21 <= c < 0x7F for c in id_bytes):
                raise FormatError(f"blob table: entry {index} has an invalid blob id {id_bytes[:80]!r}")
            blob_id = id_bytes.decode("ascii")
            if "/" in blob_id or blob_id in (".", ".."):
                raise FormatError(f"blob table: entry {index} has an invalid blob id {blob_id!r}")
            chunk_count = features = usize = csize = 0
            if self._ext_entries:
                if index >= self._ext_entries:
                    raise FormatError(
                        f"extended blob table has {self._ext_entries} entries, fewer than the blob table"
                    )
                chunk_count, features, usize, csize = EXT_BLOB_ENTRY.unpack_from(
                    buf, self._ext + index * EXT_BLOB_ENTRY_SIZE
                )
                if features & BLOB_FEATURES_INVALID or features & ~BLOB_FEATURES_KNOWN:
                    raise FormatError(
                        f"extended blob table: blob {blob_id} has unknown features {features:#x}"
                    )
            blobs.append(
                BlobInfo(
                    index=index,
                    blob_id=blob_id,
                    compressor=self.flags.compressor,
                    digester=self.flags.digester,
                    chunk_size=self.chunk_size,
                    chunk_count=chunk_count,
                    features=BlobFeatures(features),
                    compressed_size=csize,
                    uncompressed_size=usize,
                    readahead_offset=ra_off,
                    readahead_size=ra_size,
                )
            )
        return blobs

    # ------------------------------------------------------------------ records

    def _check_open(self) -> None:
        if self._closed:
            raise FormatError("v5 image is closed")

    def _record_offset(self, slot: int) -> int:
        """Where slot `slot`'s 128-byte record starts, checked to lie inside the buffer."""
        self._check_open()
        if not 1 <= slot <= self._entries:
            raise FormatError(f"inode {slot}: not in the inode table (1..{self._entries})")
        off = U32.unpack_from(self._buf, self._itab + 4 * (slot - 1))[0] << 3
        if off < RAFS_V5_SUPERBLOCK_SIZE or off + INODE_RECORD_SIZE > self._len:
            raise FormatError(
                f"inode {slot}: record offset {off} is outside the bootstrap ({self._len} bytes)"
            )
        return off

    def _record(self, slot: int) -> _Rec:
        """The validated record of inode-table slot `slot` (== inode number unless a hard link)."""
        off = self._record_offset(slot)
        buf, n, entries = self._buf, self._len, self._entries
        (
            parent,
            ino,
            uid,
            gid,
            _projid,
            mode,
            size,
            blocks,
            flags,
            nlink,
            child_index,
            child_count,
            name_size,
            symlink_size,
            rdev,
            mtime_nsec,
            mtime,
        ) = INODE_BODY.unpack_from(buf, off)
        where = f"inode {slot}"
        if not 1 <= ino <= entries:
            raise FormatError(f"{where}: i_ino {ino} is not in 1..{entries}")
        if nlink == 0:
            raise FormatError(f"{where}: i_nlink is 0")
        # Older nydus-image wrote the root with an empty name; every other inode needs one.
        if name_size > MAX_NAME or (name_size == 0 and slot != ROOT_INO):
            raise FormatError(f"{where}: name size {name_size} is not in 1..{MAX_NAME}")
        ftype = stat.S_IFMT(mode)
        if ftype not in VALID_TYPES or mode > 0o177777:
            raise FormatError(f"{where}: unknown file type in mode {mode:o}")
        if slot != ROOT_INO:
            if not 1 <= parent <= entries:
                raise FormatError(f"{where}: parent inode {parent} is not in 1..{entries}")
            if nlink == 1 and parent >= ino:
                raise FormatError(f"{where}: parent inode {parent} is not below its own inode {ino}")
        if ftype == stat.S_IFLNK and (symlink_size == 0 or not flags & V5_INODE_SYMLINK):
            raise FormatError(f"{where}: symlink without a target (size {symlink_size}, flags {flags:#x})")
        if ftype == stat.S_IFDIR and ino != slot:
            raise FormatError(f"{where}: directory records i_ino {ino}; directories cannot be hard links")
        xattr_off = off + INODE_RECORD_SIZE + align8(name_size) + align8(symlink_size)
        if xattr_off > n:
            raise FormatError(f"{where}: name/symlink run past the end of the bootstrap")
        if slot != ROOT_INO:
            name = bytes(buf[off + INODE_RECORD_SIZE : off + INODE_RECORD_SIZE + name_size])
            if b"/" in name or b"\0" in name or name in (b".", b".."):
                raise FormatError(f"{where}: invalid file name {name!r}")
        data_off = xattr_off
        if flags & V5_INODE_XATTR:
            if xattr_off + 8 > n:
                raise FormatError(f"{where}: xattr table header runs past the end of the bootstrap")
            xsize = U64.unpack_from(buf, xattr_off)[0]
            data_off = xattr_off + 8 + align8(xsize)
            if data_off > n:
                raise FormatError(f"{where}: xattr table of {xsize} bytes runs past the end of the bootstrap")
        if ftype == stat.S_IFREG:
            if data_off + child_count * CHUNK_RECORD_SIZE > n:
                raise FormatError(f"{where}: {child_count} chunk records run past the end of the bootstrap")
            if not flags & V5_INODE_HAS_HOLE:
                expected = -(-size // self.chunk_size)
                if child_count != expected:
                    raise FormatError(
                        f"{where}: {child_count} chunks for a {size}-byte file without holes, expected {expected}"
                    )
        elif (
            ftype == stat.S_IFDIR
            and child_count
            and (child_count >= entries or child_index <= ino or child_index + child_count - 1 > entries)
        ):
            raise FormatError(
                f"{where}: children slots {child_index}..+{child_count} are not after the directory "
                f"and inside the inode table (1..{entries})"
            )
        return _Rec(
            slot, off, parent, ino, uid, gid, mode, size, blocks, flags, nlink, child_index, child_count,
            name_size, symlink_size, rdev, mtime_nsec, mtime, xattr_off, data_off,
        )  # fmt: skip

    def _inode(self, ino: int) -> _Rec:
        """The primary record of inode `ino` (table[ino-1]); a hard-link copy's slot is no inode."""
        rec = self._record(ino)
        if rec.ino != ino:
            raise FormatError(f"inode {ino}: slot {ino} is a hard link to inode {rec.ino}, not an inode")
        return rec

    def _name(self, rec: _Rec) -> bytes:
        start = rec.off + INODE_RECORD_SIZE
        return bytes(self._buf[start : start + rec.name_size])

    def _dir(self, ino: int) -> _Rec:
        rec = self._inode(ino)
        if not stat.S_ISDIR(rec.mode):
            raise FormatError(f"inode {ino}: not a directory (mode {rec.mode:o})")
        return rec

    def _child(self, d: _Rec, i: int) -> tuple[_Rec, bytes]:
        """Child number `i` of directory `d`, checked to really belong to `d`."""
        slot = d.child_index + i
        rec = self._record(slot)
        where = f"inode {d.ino}: child slot {slot}"
        if rec.parent != d.ino:
            raise FormatError(f"{where} records parent {rec.parent}, not this directory")
        if rec.ino != slot:
            # A hard link: the inode itself is the record at table[i_ino-1].
            primary = self._record(rec.ino)
            if primary.ino != rec.ino or primary.ftype != rec.ftype:
                raise FormatError(
                    f"{where} is a hard link to inode {rec.ino}, whose record is "
                    f"i_ino {primary.ino} mode {primary.mode:o}, not mode {rec.mode:o}"
                )
        return rec, self._name(rec)

    # ------------------------------------------------------------------ RafsImage API

    def inode_count(self) -> int:
        """Distinct inodes: slots whose record carries their own number (hard links count once).
        A failure is cached too: the image does not change, so neither would the answer."""
        if self._unique_inodes_error is not None:
            raise FormatError(self._unique_inodes_error)
        if self._unique_inodes is None:
            try:
                self._unique_inodes = sum(
                    1
                    for slot in range(1, self._entries + 1)
                    if U64.unpack_from(self._buf, self._record_offset(slot) + INODE_INO_OFFSET)[0] == slot
                )
            except FormatError as e:
                self._unique_inodes_error = str(e)
                raise
        return self._unique_inodes

    def superblock_inodes(self) -> int:
        return self.inodes_count_hint

    @property
    def slot_count(self) -> int:
        """Entries of the inode table (every name has a slot; hard links have several)."""
        return self._entries

    def getattr(self, ino: int) -> Attr:
        rec = self._inode(ino)
        if self.flags & SuperFlags.EXPLICIT_UID_GID:
            uid, gid = rec.uid, rec.gid
        else:
            # nydusd reports its own credentials when the image does not pin them (--repeatable).
            uid, gid = os.geteuid(), os.getegid()
        return Attr(
            ino=ino,
            mode=rec.mode,
            nlink=rec.nlink,
            uid=uid,
            gid=gid,
            rdev=rec.rdev,
            size=rec.size,
            blocks=rec.blocks,
            mtime=rec.mtime,
            mtime_nsec=rec.mtime_nsec,
        )

    def lookup(self, parent: int, name: bytes) -> int | None:
        d = self._dir(parent)
        if not name or len(name) > MAX_NAME or b"/" in name or name in (b".", b".."):
            return None
        lo, hi = 0, d.child_count
        while lo < hi:
            mid = (lo + hi) // 2
            rec, got = self._child(d, mid)
            if got == name:
                return rec.ino
            if got < name:
                lo = mid + 1
            else:
                hi = mid
        return None

    def readdir(self, ino: int, offset: int = 0) -> Iterator[DirEntry]:
        d = self._dir(ino)
        return self._children(d, max(0, offset))

    def _children(self, d: _Rec, start: int) -> Iterator[DirEntry]:
        ino = d.ino
        prev: bytes | None = self._child(d, start - 1)[1] if 0 < start < d.child_count else None
        for i in range(start, d.child_count):
            rec, name = self._child(d, i)
            if prev is not None and name <= prev:
                raise FormatError(
                    f"inode {ino}: children not sorted by name ({prev!r} then {name!r} at slot {rec.slot})"
                )
            prev = name
            yield DirEntry(name, rec.ino, rec.ftype)

    def parent(self, ino: int) -> int:
        rec = self._inode(ino)
        if ino == ROOT_INO:
            return ROOT_INO
        if stat.S_ISDIR(rec.mode):
            p = self._dir(rec.parent)
            if not p.child_index <= ino < p.child_index + p.child_count:
                raise FormatError(f"inode {ino}: parent {rec.parent} does not list it among its children")
        return rec.parent

    def readlink(self, ino: int) -> bytes:
        rec = self._inode(ino)
        if not stat.S_ISLNK(rec.mode):
            raise FormatError(f"inode {ino}: not a symlink (mode {rec.mode:o})")
        return self._target(rec)

    def _target(self, rec: _Rec) -> bytes:
        start = rec.off + INODE_RECORD_SIZE + align8(rec.name_size)
        return bytes(self._buf[start : start + rec.symlink_size])

    def _xattrs(self, rec: _Rec) -> Iterator[tuple[bytes, int, int]]:
        """(name, value offset, value length) of each pair of the record's xattr table."""
        if not rec.flags & V5_INODE_XATTR:
            return
        buf = self._buf
        size = U64.unpack_from(buf, rec.xattr_off)[0]
        pos, end = rec.xattr_off + 8, rec.xattr_off + 8 + size
        while pos < end:
            if pos + 4 > end:
                raise FormatError(f"inode {rec.slot}: truncated xattr pair header at {pos}")
            plen = U32.unpack_from(buf, pos)[0]
            pos += 4
            if plen == 0 or pos + plen > end:
                raise FormatError(f"inode {rec.slot}: xattr pair of {plen} bytes overruns the xattr table")
            pair = bytes(buf[pos : pos + plen])
            nul = pair.find(b"\0")
            if nul <= 0:
                raise FormatError(f"inode {rec.slot}: xattr pair without a NUL-terminated name")
            name = pair[:nul]
            if not (name.startswith(XATTR_NAME_PREFIXES) or name in XATTR_NAMES_EXACT) or name in (
                b"user.",
                b"security.",
                b"trusted.",
            ):
                raise FormatError(f"inode {rec.slot}: xattr name {name[:80]!r} has no allowed prefix")
            yield name, pos + nul + 1, plen - nul - 1
            pos += plen

    def listxattr(self, ino: int) -> list[bytes]:
        return [name for name, _, _ in self._xattrs(self._inode(ino))]

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        for got, voff, vlen in self._xattrs(self._inode(ino)):
            if got == name:
                return bytes(self._buf[voff : voff + vlen])
        return None

    def _chunk(self, rec: _Rec, i: int) -> ChunkInfo:
        c = unpack_chunk(self._buf, rec.data_off + i * CHUNK_RECORD_SIZE)
        where = f"inode {rec.slot}: chunk {i}"
        if c.blob_index >= len(self.blobs):
            raise FormatError(f"{where} refers to blob {c.blob_index}, the image has {len(self.blobs)}")
        flags = int(c.flags)
        if flags & ~KNOWN_CHUNK_FLAGS or flags & ChunkFlags.BATCH:
            raise FormatError(f"{where} has unsupported flags {flags:#x}")
        if not 0 < c.uncompressed_size <= self.chunk_size:
            raise FormatError(
                f"{where} has uncompressed size {c.uncompressed_size}, chunk size is {self.chunk_size}"
            )
        if not 0 < c.compressed_size <= 2 * self.chunk_size:
            raise FormatError(f"{where} has implausible compressed size {c.compressed_size}")
        return c

    def _chunk_end(self, rec: _Rec, i: int) -> int:
        """file_offset + uncompressed_size of chunk `i`, without decoding the whole record."""
        usize, foff = CHUNK_EXTENT.unpack_from(self._buf, rec.data_off + i * CHUNK_RECORD_SIZE)
        return int(foff + usize)

    def _file(self, ino: int) -> _Rec:
        rec = self._inode(ino)
        if not stat.S_ISREG(rec.mode):
            raise FormatError(f"inode {ino}: not a regular file (mode {rec.mode:o})")
        return rec

    def chunks(self, ino: int, offset: int = 0, size: int | None = None) -> list[ChunkInfo]:
        rec = self._file(ino)
        offset = max(0, offset)
        end = rec.size if size is None else min(rec.size, offset + size)
        if offset >= end or rec.child_count == 0:
            return []
        out: list[ChunkInfo] = []
        cs = self.chunk_size
        if not rec.flags & V5_INODE_HAS_HOLE:
            # Chunk i covers [i*chunk_size, ...): index directly, no scan.
            for i in range(offset // cs, min((end - 1) // cs + 1, rec.child_count)):
                c = self._chunk(rec, i)
                if c.file_offset != i * cs:
                    raise FormatError(
                        f"inode {ino}: chunk {i} at file offset {c.file_offset}, expected {i * cs} (no holes)"
                    )
                out.append(c)
            return out
        # HAS_HOLE: chunks are sorted by file_offset and do not overlap; bisect on their ends.
        lo, hi = 0, rec.child_count
        while lo < hi:
            mid = (lo + hi) // 2
            if self._chunk_end(rec, mid) <= offset:
                lo = mid + 1
            else:
                hi = mid
        prev_end = self._chunk_end(rec, lo - 1) if lo > 0 else 0
        for i in range(lo, rec.child_count):
            c = self._chunk(rec, i)
            if c.file_offset < prev_end:
                raise FormatError(
                    f"inode {ino}: chunk {i} at file offset {c.file_offset} overlaps or precedes the previous "
                    f"chunk (ends at {prev_end})"
                )
            if c.file_offset >= end:
                break
            prev_end = c.file_offset + c.uncompressed_size
            out.append(c)
        return out

    def prefetch_table(self) -> list[int]:
        self._check_open()
        if not self._ptab_entries:
            return []
        inos = unpack_u32s(self._buf, self._ptab, self._ptab_entries)
        for ino in inos:
            if not 1 <= ino <= self._entries:
                raise FormatError(f"prefetch table: inode {ino} is not in 1..{self._entries}")
        return inos

    def inode_digest_ok(self, slot: int) -> bool:
        """Whether slot `slot`'s recorded i_digest matches its content (spec 3.9, not recursive).

        Regular file: H(chunk ids); symlink: H(target); directory: H(children's i_digest in slot
        order); others: H(""). Verify every slot to verify the whole tree.
        """
        rec = self._record(slot)
        buf = self._buf
        parts: list[bytes] = []
        if stat.S_ISREG(rec.mode):
            parts = [
                bytes(buf[p : p + 32])
                for p in range(
                    rec.data_off, rec.data_off + rec.child_count * CHUNK_RECORD_SIZE, CHUNK_RECORD_SIZE
                )
            ]
        elif stat.S_ISLNK(rec.mode):
            parts = [self._target(rec)]
        elif stat.S_ISDIR(rec.mode):
            for i in range(rec.child_count):
                child, _ = self._child(rec, i)
                parts.append(bytes(buf[child.off : child.off + 32]))
        return codec.digest(self.digester, b"".join(parts)) == bytes(buf[rec.off : rec.off + 32])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        buf = self._buf
        self._buf = b""
        if isinstance(buf, mmap.mmap):
            buf.close()
