"""Serialising a build tree to a RAFS v6 (EROFS-compatible) bootstrap, spec sections 4 and 9.

Two steps, so a build can reject a bad tree before it spends time on blob data:

* `plan_v6(root, opts)` validates the tree (names, types, xattr prefixes, sizes) and lays it out:
  every distinct inode gets a 32-byte-aligned place in the meta area (nid), directory and symlink
  data get blocks. Nothing here depends on chunk placement, only on chunk counts.
* `write_v6(plan, blobs, file_chunks)` fills in the bytes once the blob table is known.

Layout of the result:

    block 0   EROFS sb @1024, RAFS ext sb @1152, device slots @1408
    block 1.. blob table (256 B/blob) + prefetch table (u32 nids)
    meta area first block left empty (root nid 128, like nydus), then inodes in BFS order,
              each "inode + xattr ibody + inline tail" inside one block; regular files'
              8-byte chunk indexes follow their inode and may run on into the next block
    data      full directory blocks and non-inline symlink blocks
    chunk table (80 B records sorted by (digest, blob_index+1, ci_index)), padded to 4096

Every inode is an extended (64-byte) inode, as nydus's directory builds do: it keeps mtime with
nanoseconds, 32-bit uid/gid and rdev. Hard links of any non-directory type are one inode with
several dirents.
"""

import logging
import stat
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..rafs.constants import BlobFeatures, ChunkFlags, SuperFlags
from ..rafs.errors import FormatError
from ..rafs.layout_common import CHUNK_KEY, CHUNK_RECORD_SIZE, CHUNK_SORT_TAIL, U32, unpack_chunks
from ..rafs.layout_v6 import (
    BLOB_ENTRY,
    CHUNK_INDEX,
    CHUNK_INDEX_SIZE,
    DEVSLOT,
    DIRENT,
    DIRENT_SIZE,
    EROFS_BLKSZBITS,
    EROFS_BLOCK_SIZE,
    EROFS_CHUNK_FORMAT_INDEXES,
    EROFS_FEATURE_COMPAT_RAFS_V6,
    EROFS_FEATURE_INCOMPAT_RAFS_V6,
    EROFS_FT_BLKDEV,
    EROFS_FT_CHRDEV,
    EROFS_FT_DIR,
    EROFS_FT_REG_FILE,
    EROFS_FT_SYMLINK,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    EROFS_MAGIC,
    EROFS_NID_SIZE,
    EROFS_SUPER_OFFSET,
    EXT_SUPERBLOCK,
    EXTENDED_INODE,
    IFMT_TO_FT,
    MAX_NAME,
    RAFS_V6_DEVT_SLOTOFF,
    RAFS_V6_DEVTABLE_OFFSET,
    RAFS_V6_EXT_SUPER_OFFSET,
    SUPERBLOCK,
    V6_BLOB_ENTRY_SIZE,
    V6_DEVSLOT_SIZE,
    XATTR_ENTRY,
    XATTR_IBODY_HEADER,
    XATTR_PREFIXES,
    XATTR_WHOLE_NAMES,
)
from ..rafs.model import BlobInfo, ChunkInfo
from . import plan_common
from .options import BuildOptions
from .tree import FileData, Inode

log = logging.getLogger(__name__)

BLOCK = EROFS_BLOCK_SIZE
INODE_SIZE = EXTENDED_INODE.size  # every inode this writer makes is an extended one
MAX_BLOBS = 254  # device_id low byte = blob_index + 1, nydus asserts < 255 entries
MAPPED_BLKADDR_ALIGN = 0x8_0000  # nydus aligns device slots' flat-disk start to 512 KiB

def encode_xattrs(xattrs: Mapping[bytes, bytes], path: bytes = b"?") -> bytes:
    """Inline xattr ibody (12-byte header + 4-aligned entries), names sorted; b'' if none."""
    if not xattrs:
        return b""
    out = bytearray(XATTR_IBODY_HEADER.size)  # no name filter, no shared xattrs
    for name in sorted(xattrs):
        value = xattrs[name]
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise FormatError(f"{path!r}: xattr names and values must be bytes")
        index, suffix = _xattr_prefix(name, path)
        if len(suffix) > MAX_NAME:
            raise FormatError(f"{path!r}: xattr name {name!r} longer than {MAX_NAME} bytes after its prefix")
        if len(value) > 0xFFFF:
            raise FormatError(f"{path!r}: xattr {name!r} value of {len(value)} bytes exceeds 65535")
        out += XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def _xattr_prefix(name: bytes, path: bytes) -> tuple[int, bytes]:
    """(EROFS name_index, name suffix) of an xattr name."""
    for index, prefix in XATTR_PREFIXES.items():
        if index in XATTR_WHOLE_NAMES:
            if name == prefix:
                return index, b""
        elif name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix) :]
    raise FormatError(
        f"{path!r}: xattr {name!r} not storable in RAFS "
        "(allowed: user.*, trusted.*, security.*, system.posix_acl_access/default)"
    )


def dir_size(names: Sequence[bytes]) -> int:
    """i_size of a directory whose sorted entries (incl. '.' and '..') are `names` (spec 4.7)."""
    size = 0
    for n in names:
        ln = DIRENT_SIZE + len(n)
        if size % BLOCK + ln > BLOCK:
            size = _align(size, BLOCK)
        size += ln
    return size


def dir_blocks(entries: Sequence[tuple[bytes, int, int]]) -> list[bytes]:
    """Directory blocks for sorted (name, nid, file_type) entries; the last one is not padded."""
    blocks: list[bytes] = []
    group: list[tuple[bytes, int, int]] = []
    used = 0

    def flush() -> None:
        nameoff = DIRENT_SIZE * len(group)
        heads = bytearray()
        names = bytearray()
        for name, nid, ftype in group:
            heads += DIRENT.pack(nid, nameoff + len(names), ftype)
            names += name
        blocks.append(bytes(heads + names))

    for e in entries:
        ln = DIRENT_SIZE + len(e[0])
        if used + ln > BLOCK:
            flush()
            group.clear()
            used = 0
        group.append(e)
        used += ln
    if group:
        flush()
    return blocks


class _Rec:
    """Layout record of one distinct inode (hard links share one).

    Kept small (one per inode of the image): the path is not stored but rebuilt from `name` and
    `parent` (the first name met, in BFS order), the inode number is the record's position.
    """

    __slots__ = (
        "inode",
        "name",
        "nlink",
        "parent",
        "names",
        "kids",
        "xattr",
        "layout",
        "dsize",
        "nchunks",
        "off",
        "data_blk",
        "ftype",
    )

    def __init__(self, inode: Inode, name: bytes, parent: "_Rec | None", ftype: int) -> None:
        self.inode = inode
        self.name = name
        self.nlink = 1
        self.parent = parent  # the directory first met holding it (the root: itself)
        self.names: list[bytes] | None = None  # dirs: sorted entry names ...
        self.kids: list[_Rec] | None = None  # ... and their records
        self.xattr = b""
        self.layout = EROFS_INODE_FLAT_PLAIN
        self.dsize = 0  # i_size
        self.nchunks = 0
        self.off = 0  # offset inside the meta area
        self.data_blk = -1  # first data block, relative to the data area
        self.ftype = ftype

    @property
    def path(self) -> bytes:
        names: list[bytes] = []
        r = self
        while r.parent is not None and r.parent is not r:
            names.append(r.name)
            r = r.parent
        return b"/" + b"/".join(reversed(names))


@dataclass
class V6Plan:
    """A validated, laid-out tree, ready for `write_v6` once blobs and chunks are known."""

    chunk_size: int
    records: list[_Rec]  # BFS order (inode number - 1); records[0] is the root
    inode_area: int  # bytes of the meta area used by inodes (incl. the empty first block)
    data_blocks: int  # blocks of directory/symlink data after the inode area
    prefetch: list[_Rec] = field(default_factory=list)
    has_xattr: bool = False

    def regular_files(self) -> list[tuple[bytes, Inode]]:
        """(path, inode) of every distinct regular file, BFS order."""
        return [(r.path, r.inode) for r in self.records if r.ftype == EROFS_FT_REG_FILE]

    def data_order(self) -> list[Inode]:
        """Regular files with new data (`FileData`) in blob order: prefetch matches first.

        Like nydus: a file under a prefetch pattern goes in pattern order, everything else in
        BFS order; empty files are skipped.
        """
        patterns = {r.path: i for i, r in enumerate(self.prefetch)}
        first: list[tuple[int, int, Inode]] = []
        rest: list[Inode] = []
        for seq, r in enumerate(self.records):
            if (
                r.ftype != EROFS_FT_REG_FILE
                or not isinstance(r.inode.data, FileData)
                or r.inode.data.size == 0
            ):
                continue
            idx = plan_common.match_pattern(r.path, patterns) if patterns else None
            if idx is None:
                rest.append(r.inode)
            else:
                first.append((idx, seq, r.inode))
        first.sort(key=lambda t: (t[0], t[1]))
        return [t[2] for t in first] + rest


def plan_v6(root: Inode, opts: BuildOptions) -> V6Plan:
    """Validate `root` and lay it out; FormatError names the first offending path."""
    cs = plan_common.check_root(root, opts)

    records: list[_Rec] = []
    by_id: dict[int, _Rec] = {}  # only while planning: finds hard links

    def new_rec(node: Inode, name: bytes, parent: _Rec | None) -> _Rec:
        ftype = IFMT_TO_FT.get(stat.S_IFMT(node.mode))
        if ftype is None:
            where = b"/" if parent is None else plan_common.join(parent.path, name)
            raise FormatError(f"{where!r}: unsupported file type in mode {node.mode:#o}")
        rec = _Rec(node, name, parent, ftype)
        records.append(rec)
        by_id[id(node)] = rec
        return rec

    root_rec = new_rec(root, b"", None)
    root_rec.parent = root_rec
    queue: deque[_Rec] = deque([root_rec])
    while queue:
        d = queue.popleft()
        kids = d.inode.children or {}
        names = sorted(kids)
        recs: list[_Rec] = []
        subdirs = 0
        for name in names:
            plan_common.check_name(name, d.path)
            child = kids[name]
            if not isinstance(child, Inode):
                raise FormatError(f"{plan_common.join(d.path, name)!r}: not an Inode")
            rec = by_id.get(id(child))
            if rec is not None:
                if rec.ftype == EROFS_FT_DIR:
                    raise FormatError(
                        f"{plan_common.join(d.path, name)!r}: directory linked twice (hard-linked dir or loop)"
                    )
                rec.nlink += 1
            else:
                rec = new_rec(child, name, d)
                if rec.ftype == EROFS_FT_DIR:
                    queue.append(rec)
            if rec.ftype == EROFS_FT_DIR:
                subdirs += 1
            recs.append(rec)
        d.names, d.kids = names, recs
        d.nlink = 2 + subdirs
    by_id.clear()

    has_xattr = False
    for r in records:
        node = r.inode
        if r.ftype != EROFS_FT_DIR and node.children:
            raise FormatError(f"{r.path!r}: only directories can have children")
        plan_common.check_attrs(r.path, node)
        r.xattr = encode_xattrs(node.xattrs, r.path)
        has_xattr = has_xattr or bool(r.xattr)
        if INODE_SIZE + len(r.xattr) > BLOCK:
            raise FormatError(
                f"{r.path!r}: xattrs take {len(r.xattr)} bytes, more than fit beside the inode in a block"
            )
        if r.ftype == EROFS_FT_DIR:
            assert r.names is not None
            r.dsize = dir_size(sorted([b".", b"..", *r.names]))
        elif r.ftype == EROFS_FT_SYMLINK:
            r.dsize = plan_common.symlink_size(r.path, node)
        elif r.ftype == EROFS_FT_REG_FILE:
            size = plan_common.file_size(r.path, node)
            r.dsize = size
            r.nchunks = (size + cs - 1) // cs
            r.layout = EROFS_INODE_CHUNK_BASED

    # -- inode placement ------------------------------------------------------------------------
    cur = BLOCK  # first meta block stays empty, so the root's nid is 128 and never 0
    gaps: list[list[int]] = []  # [start, end) free tails of blocks, each inside one block

    def alloc(contig: int, total: int) -> int:
        nonlocal cur
        if total <= BLOCK:
            for g in gaps:
                if g[1] - g[0] >= total:
                    off = g[0]
                    g[0] = _align(off + total, EROFS_NID_SIZE)
                    if g[1] - g[0] < 64:
                        gaps.remove(g)
                    return off
        if cur % BLOCK + contig > BLOCK:
            nxt = _align(cur, BLOCK)
            if nxt - cur >= 64:
                gaps.append([cur, nxt])
                if len(gaps) > 16:
                    del gaps[0]
            cur = nxt
        off = cur
        cur = _align(cur + total, EROFS_NID_SIZE)
        return off

    for r in records:
        base = INODE_SIZE + len(r.xattr)
        if r.ftype in (EROFS_FT_DIR, EROFS_FT_SYMLINK):
            tail = r.dsize % BLOCK
            if tail and base + tail <= BLOCK:
                r.layout = EROFS_INODE_FLAT_INLINE
                r.off = alloc(base + tail, base + tail)
            else:
                r.layout = EROFS_INODE_FLAT_PLAIN
                r.off = alloc(base, base)
        elif r.ftype == EROFS_FT_REG_FILE:
            r.off = alloc(base, _align(base, CHUNK_INDEX_SIZE) + CHUNK_INDEX_SIZE * r.nchunks)
        else:
            r.off = alloc(base, base)

    data_blocks = 0
    for r in records:
        if r.ftype in (EROFS_FT_DIR, EROFS_FT_SYMLINK):
            n = r.dsize // BLOCK if r.layout == EROFS_INODE_FLAT_INLINE else _align(r.dsize, BLOCK) // BLOCK
            if n:
                r.data_blk = data_blocks
                data_blocks += n

    plan = V6Plan(cs, records, cur, data_blocks, has_xattr=has_xattr)
    plan.prefetch = _resolve_prefetch(root_rec, opts.prefetch_paths)
    return plan


def _resolve_prefetch(root: _Rec, paths: Sequence[bytes]) -> list[_Rec]:
    """Records named by absolute prefetch paths, in order; covered and missing paths are dropped
    with a warning, as nydus does."""
    chosen: list[bytes] = []
    out: list[_Rec] = []
    for raw in paths:
        got = plan_common.prefetch_path(raw, chosen)
        if got == "relative":
            log.warning("prefetch path %r is not absolute; ignored", raw)
            continue
        if isinstance(got, str):
            log.info("prefetch path %r is covered by an earlier one", raw)
            continue
        norm, parts = got
        rec: _Rec | None = root
        for comp in parts:
            if rec is None or rec.names is None or rec.kids is None:
                rec = None
                break
            rec = next((r for n, r in zip(rec.names, rec.kids, strict=True) if n == comp), None)
        if rec is None:
            log.warning("prefetch path %r is not in the image; ignored", raw)
            continue
        chosen.append(norm)
        out.append(rec)
    return out


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _validate_blobs(blobs: Sequence[BlobInfo], chunk_size: int) -> None:
    if len(blobs) > MAX_BLOBS:
        raise FormatError(f"{len(blobs)} blobs; RAFS v6 images reference at most {MAX_BLOBS}")
    for i, b in enumerate(blobs):
        bid = b.blob_id.encode() if b.blob_id.isascii() else b""
        if not 0 < len(bid) <= 64:
            raise FormatError(f"blob {i}: id {b.blob_id!r} must be 1..64 ASCII characters")
        if b.chunk_size != chunk_size:
            raise FormatError(
                f"blob {b.blob_id}: chunk size {b.chunk_size:#x} differs from the image's {chunk_size:#x}"
            )
        if b.uncompressed_size <= 0 or b.uncompressed_size % BLOCK:
            raise FormatError(
                f"blob {b.blob_id}: uncompressed size {b.uncompressed_size} is not a positive 4K multiple"
            )
        if not b.features & BlobFeatures.ALIGNED:
            raise FormatError(f"blob {b.blob_id}: v6 needs 4K-aligned (ALIGNED) blobs")


def write_v6(
    plan: V6Plan,
    blobs: Sequence[BlobInfo],
    file_chunks: Callable[[Inode], bytes],
    opts: BuildOptions,
) -> bytearray:
    """The bootstrap bytes. `file_chunks(inode)` is every regular file's chunk list in file
    order as packed records, `blob_index` relative to `blobs` (the image's blob table, in order).

    The chunk table is gathered first, so the result is allocated once at its final size and
    returned without a copy (a bootstrap of 100k files is ~20 MiB)."""
    cs = plan.chunk_size
    _validate_blobs(blobs, cs)
    nblobs = len(blobs)
    blob_table_offset = _align(RAFS_V6_DEVTABLE_OFFSET + V6_DEVSLOT_SIZE * nblobs, BLOCK)
    blob_table_size = V6_BLOB_ENTRY_SIZE * nblobs
    prefetch = plan.prefetch if nblobs else []
    prefetch_offset = blob_table_offset + blob_table_size if prefetch else 0
    prefetch_size = 4 * len(prefetch)
    meta_blkaddr = _align(blob_table_offset + blob_table_size + prefetch_size, BLOCK) // BLOCK
    meta_base = meta_blkaddr * BLOCK
    data_blk0 = meta_blkaddr + _align(plan.inode_area, BLOCK) // BLOCK
    chunk_table_offset = (data_blk0 + plan.data_blocks) * BLOCK
    chunk_format = EROFS_CHUNK_FORMAT_INDEXES | (cs.bit_length() - 1 - EROFS_BLKSZBITS)
    explicit = not opts.repeatable
    chunk_table = _chunk_table(plan, file_chunks, nblobs)  # before `buf`: its index is gone then
    nrecords = len(chunk_table) // CHUNK_RECORD_SIZE
    buf = bytearray(_align(chunk_table_offset + len(chunk_table), BLOCK))
    buf[chunk_table_offset : chunk_table_offset + len(chunk_table)] = chunk_table
    del chunk_table

    for ino, r in enumerate(plan.records, 1):
        node = r.inode
        pos = meta_base + r.off
        base = INODE_SIZE + len(r.xattr)
        i_u = 0
        if r.ftype == EROFS_FT_DIR:
            assert r.names is not None and r.kids is not None and r.parent is not None
            nid, parent_nid = r.off // EROFS_NID_SIZE, r.parent.off // EROFS_NID_SIZE
            ents = [(b".", nid, EROFS_FT_DIR), (b"..", parent_nid, EROFS_FT_DIR)]
            ents += [(n, c.off // EROFS_NID_SIZE, c.ftype) for n, c in zip(r.names, r.kids, strict=True)]
            ents.sort(key=lambda e: e[0])
            blocks = dir_blocks(ents)
            i_u = _place_data(buf, r, blocks, pos + base, data_blk0)
        elif r.ftype == EROFS_FT_SYMLINK:
            target = node.symlink or b""
            pieces = [target[i : i + BLOCK] for i in range(0, len(target), BLOCK)]
            i_u = _place_data(buf, r, pieces, pos + base, data_blk0)
        elif r.ftype == EROFS_FT_REG_FILE:
            i_u = chunk_format
            packed = file_chunks(node) if r.nchunks else b""
            ipos = _align(pos + base, CHUNK_INDEX_SIZE)
            for k, (blob_index, uoff, index) in enumerate(CHUNK_KEY.iter_unpack(packed)):
                CHUNK_INDEX.pack_into(
                    buf,
                    ipos + k * CHUNK_INDEX_SIZE,
                    index & 0xFFFF,
                    (blob_index + 1) | (((index >> 16) & 0xFF) << 8),
                    uoff // BLOCK,
                )
        elif r.ftype in (EROFS_FT_CHRDEV, EROFS_FT_BLKDEV):
            i_u = node.rdev & 0xFFFF_FFFF
        EXTENDED_INODE.pack_into(
            buf,
            pos,
            1 | (r.layout << 1),
            (len(r.xattr) - XATTR_IBODY_HEADER.size) // 4 + 1 if r.xattr else 0,
            node.mode & 0xFFFF,
            r.dsize,
            i_u,
            ino,
            node.uid if explicit else 0,
            node.gid if explicit else 0,
            node.mtime,
            node.mtime_nsec,
            r.nlink,
        )
        if r.xattr:
            buf[pos + INODE_SIZE : pos + base] = r.xattr

    # device slots (nydus places each blob's flat-disk image at a 512 KiB boundary after the last)
    pos = len(buf)
    total_blocks = 0
    for i, b in enumerate(blobs):
        cnt = b.uncompressed_size // BLOCK
        if cnt > 0xFFFF_FFFF or total_blocks + cnt > 0xFFFF_FFFF:
            raise FormatError(f"blob {b.blob_id}: too many data blocks for RAFS v6")
        mapped = _align(pos, MAPPED_BLKADDR_ALIGN) // BLOCK
        pos = (mapped + cnt) * BLOCK
        total_blocks += cnt
        DEVSLOT.pack_into(
            buf, RAFS_V6_DEVTABLE_OFFSET + i * V6_DEVSLOT_SIZE, b.blob_id.encode(), cnt, mapped
        )
        BLOB_ENTRY.pack_into(
            buf,
            blob_table_offset + i * V6_BLOB_ENTRY_SIZE,
            b.blob_id.encode(),
            i,
            b.chunk_size,
            b.chunk_count,
            int(b.compressor),
            int(b.digester),
            int(b.features),
            b.compressed_size,
            b.uncompressed_size,
            b.blob_toc_size,
            int(b.ci_compressor),
            b.ci_offset,
            b.ci_compressed_size,
            b.ci_uncompressed_size,
            b.blob_toc_digest,
            b"\0" * 32,
            0,
            0,
        )
    for i, pr in enumerate(prefetch):
        U32.pack_into(buf, prefetch_offset + 4 * i, pr.off // EROFS_NID_SIZE)

    flags = SuperFlags.for_algorithms(opts.compressor, opts.digester)
    if explicit:
        flags |= SuperFlags.EXPLICIT_UID_GID
    if plan.has_xattr:
        flags |= SuperFlags.HAS_XATTR
    if blobs and all(b.features & BlobFeatures.INLINED_CHUNK_DIGEST for b in blobs):
        flags |= SuperFlags.INLINED_CHUNK_DIGEST
    EXT_SUPERBLOCK.pack_into(
        buf,
        RAFS_V6_EXT_SUPER_OFFSET,
        int(flags),
        blob_table_offset,
        blob_table_size,
        cs,
        chunk_table_offset,
        CHUNK_RECORD_SIZE * nrecords,
        prefetch_offset,
        prefetch_size,
    )
    root_nid = plan.records[0].off // EROFS_NID_SIZE
    assert root_nid <= 0xFFFF
    SUPERBLOCK.pack_into(
        buf,
        EROFS_SUPER_OFFSET,
        EROFS_MAGIC,
        0,
        EROFS_FEATURE_COMPAT_RAFS_V6,
        EROFS_BLKSZBITS,
        0,
        root_nid,
        len(plan.records),
        0,
        0,
        total_blocks,
        meta_blkaddr,
        0,
        b"\0" * 16,
        b"\0" * 16,
        EROFS_FEATURE_INCOMPAT_RAFS_V6,
        0,
        nblobs,
        RAFS_V6_DEVT_SLOTOFF,
    )
    return buf


def _chunk_table(plan: V6Plan, file_chunks: Callable[[Inode], bytes], nblobs: int) -> bytearray:
    """Check every file's chunks (in record order) and return the chunk table: the distinct
    chunk records (the first reference of each), sorted by (digest, blob_index + 1, ci_index).
    The only object per chunk is its sort key, and only while this runs."""
    cs = plan.chunk_size
    keys: dict[bytes, int] = {}
    records = bytearray()
    for r in plan.records:
        if r.ftype != EROFS_FT_REG_FILE:
            continue
        packed = file_chunks(r.inode) if r.nchunks else b""
        n = len(packed) // CHUNK_RECORD_SIZE
        if n != r.nchunks:
            raise FormatError(f"{r.path!r}: {n} chunks for {r.dsize} bytes, expected {r.nchunks}")
        for k, c in enumerate(unpack_chunks(packed)):
            _check_chunk(r, k, c, cs, nblobs)
            key = c.digest + CHUNK_SORT_TAIL.pack(c.blob_index + 1, c.index)
            if key not in keys:
                keys[key] = len(keys)
                records += packed[k * CHUNK_RECORD_SIZE : (k + 1) * CHUNK_RECORD_SIZE]
    table = bytearray(len(records))
    for i, key in enumerate(sorted(keys)):
        src = keys[key] * CHUNK_RECORD_SIZE
        table[i * CHUNK_RECORD_SIZE : (i + 1) * CHUNK_RECORD_SIZE] = records[src : src + CHUNK_RECORD_SIZE]
    return table



def _place_data(buf: bytearray, r: _Rec, pieces: list[bytes], inline_pos: int, data_blk0: int) -> int:
    """Write dir/symlink data blocks; returns i_u (raw_blkaddr of the first full block)."""
    if r.layout == EROFS_INODE_FLAT_INLINE:
        full, tail = pieces[:-1], pieces[-1]
        assert len(tail) < BLOCK
        buf[inline_pos : inline_pos + len(tail)] = tail
    else:
        full = pieces
    if not full:
        return 0
    blk = data_blk0 + r.data_blk
    for i, p in enumerate(full):
        o = (blk + i) * BLOCK
        buf[o : o + len(p)] = p
    return blk


def _check_chunk(r: _Rec, k: int, c: ChunkInfo, cs: int, nblobs: int) -> None:
    want = min(cs, r.dsize - k * cs)
    if c.file_offset != k * cs or c.uncompressed_size != want:
        raise FormatError(
            f"{r.path!r}: chunk {k} covers [{c.file_offset}, +{c.uncompressed_size}), "
            f"expected [{k * cs}, +{want}) (v6 files are dense chunk arrays)"
        )
    if not 0 <= c.blob_index < nblobs:
        raise FormatError(f"{r.path!r}: chunk {k} refers to blob {c.blob_index}, image has {nblobs}")
    if c.uncompressed_offset % BLOCK:
        raise FormatError(
            f"{r.path!r}: chunk {k} uncompressed offset {c.uncompressed_offset:#x} not 4K aligned"
        )
    if not 0 <= c.index < 1 << 24:
        raise FormatError(f"{r.path!r}: chunk {k} ci_index {c.index} needs more than 24 bits")
    if c.uncompressed_offset // BLOCK > 0xFFFF_FFFF:
        raise FormatError(f"{r.path!r}: chunk {k} uncompressed offset beyond 16 TiB")
    if c.flags & ~(ChunkFlags.COMPRESSED | ChunkFlags.HAS_CRC32 | ChunkFlags.ENCRYPTED | ChunkFlags.BATCH):
        raise FormatError(f"{r.path!r}: chunk {k} has unknown flags {int(c.flags):#x}")
