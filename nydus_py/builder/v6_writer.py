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
from array import array
from collections.abc import Callable, Mapping, Sequence

from ..rafs.constants import BlobFeatures, ChunkFlags, SuperFlags
from ..rafs.errors import FormatError
from ..rafs.layout_common import CHUNK, CHUNK_KEY, CHUNK_RECORD_SIZE, CHUNK_SORT_TAIL, U32, unpack_chunks
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
from .packed import K_SYMLINK, Tree, as_tree
from .tree import Inode

log = logging.getLogger(__name__)

BLOCK = EROFS_BLOCK_SIZE
INODE_SIZE = EXTENDED_INODE.size  # every inode this writer makes is an extended one
MAX_BLOBS = 254  # device_id low byte = blob_index + 1, nydus asserts < 255 entries
MAPPED_BLKADDR_ALIGN = 0x8_0000  # nydus aligns device slots' flat-disk start to 512 KiB
_BLOB_AND_INDEX = CHUNK.view("blob_index", "index")
_BLOB_INDEX_END = CHUNK.offset("blob_index") + 4  # digest + blob_index open every record
_INDEX_AT = CHUNK.offset("index")
# chunk flags a v6 image may carry (an int: enum operations per chunk would cost more than the rest)
_CHUNK_FLAGS_OK = int(ChunkFlags.COMPRESSED | ChunkFlags.HAS_CRC32 | ChunkFlags.ENCRYPTED | ChunkFlags.BATCH)


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


class V6Plan:
    """A validated, laid-out tree, ready for `write_v6` once blobs and chunks are known.

    One record per distinct inode (hard links share one), in BFS order (inode number - 1;
    record 0 is the root), kept as array columns, not an object per inode: `r_node` is the
    tree entry holding the inode's attributes, `r_name` the entry of its first name met (for
    paths), `r_parent` the record of the directory holding that name (the root: itself).
    """

    def __init__(self, tree: Tree, chunk_size: int) -> None:
        self.tree = tree
        self.chunk_size = chunk_size
        self.children = tree.children()
        self.rec_of = array("i", [-1]) * len(tree)  # inode entry -> record
        self.r_node = array("i")
        self.r_name = array("i")
        self.r_parent = array("i")
        self.r_nlink = array("I")
        self.r_ftype = array("B")
        self.r_layout = array("B")
        self.r_xlen = array("H")
        self.r_dsize = array("Q")
        self.r_off = array("Q")
        self.r_data_blk = array("q")
        self.inode_area = 0  # bytes of the meta area used by inodes (incl. the empty first block)
        self.data_blocks = 0  # blocks of directory/symlink data after the inode area
        self.prefetch: list[int] = []  # records
        self.has_xattr = False

    def __len__(self) -> int:
        return len(self.r_node)

    def path(self, r: int) -> bytes:
        return self.tree.path(self.r_name[r])

    def nchunks(self, r: int) -> int:
        cs = self.chunk_size
        return (self.r_dsize[r] + cs - 1) // cs if self.r_ftype[r] == EROFS_FT_REG_FILE else 0

    def _new(self, node: int, name: int, parent: int, ftype: int) -> int:
        r = len(self.r_node)
        self.r_node.append(node)
        self.r_name.append(name)
        self.r_parent.append(parent)
        self.r_nlink.append(1)
        self.r_ftype.append(ftype)
        self.r_layout.append(EROFS_INODE_FLAT_PLAIN)
        self.r_xlen.append(0)
        self.r_dsize.append(0)
        self.r_off.append(0)
        self.r_data_blk.append(-1)
        self.rec_of[node] = r
        return r

    def regular_files(self) -> "array[int]":
        """Inode entries of every distinct regular file, BFS order."""
        ft, node = self.r_ftype, self.r_node
        return array("i", (node[r] for r in range(len(node)) if ft[r] == EROFS_FT_REG_FILE))

    def data_order(self) -> "array[int]":
        """Inode entries of regular files with new data in blob order: prefetch matches first.

        Like nydus: a file under a prefetch pattern goes in pattern order, everything else in
        BFS order; empty files are skipped.
        """
        tree = self.tree
        patterns = {self.path(r): i for i, r in enumerate(self.prefetch)}
        first: list[tuple[int, int, int]] = []
        rest = array("i")
        for r in range(len(self.r_node)):
            n = self.r_node[r]
            if self.r_ftype[r] != EROFS_FT_REG_FILE or not tree.has_new_data(n) or tree.size[n] == 0:
                continue
            idx = plan_common.match_pattern(self.path(r), patterns) if patterns else None
            if idx is None:
                rest.append(n)
            else:
                first.append((idx, r, n))
        first.sort(key=lambda t: (t[0], t[1]))
        return array("i", [t[2] for t in first]) + rest


def plan_v6(root: "Tree | Inode", opts: BuildOptions) -> V6Plan:
    """Validate `root` and lay it out; FormatError names the first offending path."""
    tree = as_tree(root)
    cs = plan_common.check_root(tree.is_dir(0), opts)
    plan = V6Plan(tree, cs)
    ch = plan.children
    rec_of, r_node, r_ftype, r_nlink = plan.rec_of, plan.r_node, plan.r_ftype, plan.r_nlink

    def ftype_of(node: int, where: int) -> int:
        ftype = IFMT_TO_FT.get(stat.S_IFMT(tree.mode[node]))
        if ftype is None:
            raise FormatError(f"{tree.path(where)!r}: unsupported file type in mode {tree.mode[node]:#o}")
        return ftype

    plan._new(0, 0, 0, ftype_of(0, 0))
    head = 0
    while head < len(r_node):  # records grow behind `head`: BFS over directory records
        d = head
        head += 1
        if r_ftype[d] != EROFS_FT_DIR:
            continue
        e = r_node[d]
        dpath: bytes | None = None
        subdirs = 0
        for c in ch.of(e):
            name = tree.name(c)
            if not name or len(name) > plan_common.MAX_NAME or b"/" in name or b"\0" in name or name in (b".", b".."):
                dpath = dpath or tree.path(e)
                plan_common.check_name(name, dpath)
            t = tree.resolve(c)
            rec = rec_of[t]
            if rec >= 0:
                if r_ftype[rec] == EROFS_FT_DIR:
                    raise FormatError(f"{tree.path(c)!r}: directory linked twice (hard-linked dir or loop)")
                r_nlink[rec] += 1
            else:
                rec = plan._new(t, c, d, ftype_of(t, c))
            if r_ftype[rec] == EROFS_FT_DIR:
                subdirs += 1
        r_nlink[d] = 2 + subdirs

    has_xattr = False
    for r in range(len(r_node)):
        n = r_node[r]
        ft = r_ftype[r]
        if tree.nsec[n] > 999_999_999:
            raise FormatError(f"{plan.path(r)!r}: mtime_nsec {tree.nsec[n]} out of range")
        if tree.xlen[n]:
            xlen = len(encode_xattrs(tree.xattrs(n), plan.path(r)))
            plan.r_xlen[r] = xlen
            has_xattr = has_xattr or bool(xlen)
            if INODE_SIZE + xlen > BLOCK:
                raise FormatError(
                    f"{plan.path(r)!r}: xattrs take {xlen} bytes, more than fit beside the inode in a block"
                )
        if ft == EROFS_FT_DIR:
            names = [b".", b".."]
            names += (tree.name(c) for c in ch.of(n))
            names.sort()
            plan.r_dsize[r] = dir_size(names)
        elif ft == EROFS_FT_SYMLINK:
            plan.r_dsize[r] = _symlink_size(plan, r)
        elif ft == EROFS_FT_REG_FILE:
            plan.r_dsize[r] = tree.size[n]
            plan.r_layout[r] = EROFS_INODE_CHUNK_BASED

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

    r_off, r_layout, r_dsize = plan.r_off, plan.r_layout, plan.r_dsize
    for r in range(len(r_node)):
        ft = r_ftype[r]
        base = INODE_SIZE + plan.r_xlen[r]
        if ft in (EROFS_FT_DIR, EROFS_FT_SYMLINK):
            tail = r_dsize[r] % BLOCK
            if tail and base + tail <= BLOCK:
                r_layout[r] = EROFS_INODE_FLAT_INLINE
                r_off[r] = alloc(base + tail, base + tail)
            else:
                r_layout[r] = EROFS_INODE_FLAT_PLAIN
                r_off[r] = alloc(base, base)
        elif ft == EROFS_FT_REG_FILE:
            r_off[r] = alloc(base, _align(base, CHUNK_INDEX_SIZE) + CHUNK_INDEX_SIZE * plan.nchunks(r))
        else:
            r_off[r] = alloc(base, base)

    data_blocks = 0
    for r in range(len(r_node)):
        if r_ftype[r] in (EROFS_FT_DIR, EROFS_FT_SYMLINK):
            dsize = r_dsize[r]
            n = dsize // BLOCK if r_layout[r] == EROFS_INODE_FLAT_INLINE else _align(dsize, BLOCK) // BLOCK
            if n:
                plan.r_data_blk[r] = data_blocks
                data_blocks += n

    plan.inode_area, plan.data_blocks, plan.has_xattr = cur, data_blocks, has_xattr
    plan.prefetch = _resolve_prefetch(plan, opts.prefetch_paths)
    return plan


def _symlink_size(plan: V6Plan, r: int) -> int:
    tree, n = plan.tree, plan.r_node[r]
    size = tree.b[n] if tree.kind[n] == K_SYMLINK else 0
    if not 0 < size <= plan_common.MAX_SYMLINK or b"\0" in tree.symlink(n):
        raise FormatError(
            f"{plan.path(r)!r}: symlink target must be 1..{plan_common.MAX_SYMLINK} bytes without NUL"
        )
    return size


def _resolve_prefetch(plan: V6Plan, paths: Sequence[bytes]) -> list[int]:
    """Records named by absolute prefetch paths, in order; covered and missing paths are dropped
    with a warning, as nydus does."""
    tree, ch = plan.tree, plan.children
    chosen: list[bytes] = []
    out: list[int] = []
    for raw in paths:
        got = plan_common.prefetch_path(raw, chosen)
        if got == "relative":
            log.warning("prefetch path %r is not absolute; ignored", raw)
            continue
        if isinstance(got, str):
            log.info("prefetch path %r is covered by an earlier one", raw)
            continue
        norm, parts = got
        node = 0
        for comp in parts:
            if node < 0 or plan.r_ftype[plan.rec_of[node]] != EROFS_FT_DIR:
                node = -1
                break
            node = next((tree.resolve(c) for c in ch.of(node) if tree.name(c) == comp), -1)
        if node < 0:
            log.warning("prefetch path %r is not in the image; ignored", raw)
            continue
        chosen.append(norm)
        out.append(plan.rec_of[node])
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
    file_chunks: Callable[[int], bytes],
    opts: BuildOptions,
) -> bytearray:
    """The bootstrap bytes. `file_chunks(entry)` is every regular file's chunk list in file
    order as packed records, `blob_index` relative to `blobs` (the image's blob table, in order).

    The chunk table is gathered first, so the result is allocated once at its final size and
    returned without a copy (a bootstrap of 100k files is ~20 MiB)."""
    cs = plan.chunk_size
    tree = plan.tree
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

    r_off, rec_of, r_ftype = plan.r_off, plan.rec_of, plan.r_ftype
    for r in range(len(plan)):
        n = plan.r_node[r]
        ft = r_ftype[r]
        pos = meta_base + r_off[r]
        xattr = encode_xattrs(tree.xattrs(n)) if plan.r_xlen[r] else b""
        base = INODE_SIZE + len(xattr)
        i_u = 0
        if ft == EROFS_FT_DIR:
            nid, parent_nid = r_off[r] // EROFS_NID_SIZE, r_off[plan.r_parent[r]] // EROFS_NID_SIZE
            ents = [(b".", nid, EROFS_FT_DIR), (b"..", parent_nid, EROFS_FT_DIR)]
            for c in plan.children.of(n):
                cr = rec_of[tree.resolve(c)]
                ents.append((tree.name(c), r_off[cr] // EROFS_NID_SIZE, r_ftype[cr]))
            ents.sort(key=lambda e: e[0])
            i_u = _place_data(buf, plan, r, dir_blocks(ents), pos + base, data_blk0)
        elif ft == EROFS_FT_SYMLINK:
            target = tree.symlink(n)
            pieces = [target[i : i + BLOCK] for i in range(0, len(target), BLOCK)]
            i_u = _place_data(buf, plan, r, pieces, pos + base, data_blk0)
        elif ft == EROFS_FT_REG_FILE:
            i_u = chunk_format
            packed = file_chunks(n) if plan.r_dsize[r] else b""
            ipos = _align(pos + base, CHUNK_INDEX_SIZE)
            for k, (blob_index, uoff, index) in enumerate(CHUNK_KEY.iter_unpack(packed)):
                CHUNK_INDEX.pack_into(
                    buf,
                    ipos + k * CHUNK_INDEX_SIZE,
                    index & 0xFFFF,
                    (blob_index + 1) | (((index >> 16) & 0xFF) << 8),
                    uoff // BLOCK,
                )
        elif ft in (EROFS_FT_CHRDEV, EROFS_FT_BLKDEV):
            i_u = tree.rdev(n) & 0xFFFF_FFFF
        EXTENDED_INODE.pack_into(
            buf,
            pos,
            1 | (plan.r_layout[r] << 1),
            (len(xattr) - XATTR_IBODY_HEADER.size) // 4 + 1 if xattr else 0,
            tree.mode[n] & 0xFFFF,
            plan.r_dsize[r],
            i_u,
            r + 1,
            tree.uid[n] if explicit else 0,
            tree.gid[n] if explicit else 0,
            tree.mtime[n],
            tree.nsec[n],
            plan.r_nlink[r],
        )
        if xattr:
            buf[pos + INODE_SIZE : pos + base] = xattr

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
        U32.pack_into(buf, prefetch_offset + 4 * i, r_off[pr] // EROFS_NID_SIZE)

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
    root_nid = r_off[0] // EROFS_NID_SIZE
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
        len(plan),
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


def _chunk_table(plan: V6Plan, file_chunks: Callable[[int], bytes], nblobs: int) -> bytearray:
    """Check every file's chunks (in record order) and return the chunk table: the distinct
    chunk records (the first reference of each), sorted by (digest, blob_index + 1, ci_index).

    Distinct records are found with an open-addressing table of record numbers over the
    gathered records, and sorted one leading digest byte at a time: the sort keys exist for
    1/256 of the chunks at once, never an object per chunk for the whole table."""
    cs = plan.chunk_size
    records = bytearray()
    # sized for the tree's chunk records (an upper bound for most images: files with new data
    # add theirs) at a load of 1/4: no rehash while filling, and few probes that compare keys
    cap = 1024
    while cap < 4 * (len(plan.tree.chunks) // CHUNK_RECORD_SIZE):
        cap *= 2
    table = array("q", bytes(8 * cap))
    mask = cap - 1
    count = 0
    buckets = [array("I") for _ in range(256)]  # record numbers by the digest's first byte
    size, key_end, ix, ix_end = CHUNK_RECORD_SIZE, _BLOB_INDEX_END, _INDEX_AT, _INDEX_AT + 4
    iter_unpack, r_ftype, r_node, r_dsize = CHUNK.iter_unpack, plan.r_ftype, plan.r_node, plan.r_dsize
    for r in range(len(plan)):
        if r_ftype[r] != EROFS_FT_REG_FILE:
            continue
        nchunks = plan.nchunks(r)
        packed = file_chunks(r_node[r]) if nchunks else b""
        n = len(packed) // size
        if n != nchunks:
            raise FormatError(f"{plan.path(r)!r}: {n} chunks for {r_dsize[r]} bytes, expected {nchunks}")
        dsize = r_dsize[r]
        off = 0
        for k, (_d, bi, flags, _cs, usize, _co, uoff, foff, index, _crc) in enumerate(iter_unpack(packed)):
            if (foff != k * cs or usize != min(cs, dsize - k * cs) or not 0 <= bi < nblobs or uoff % BLOCK
                    or not 0 <= index < 1 << 24 or uoff // BLOCK > 0xFFFF_FFFF or flags & ~_CHUNK_FLAGS_OK):
                _check_chunk(plan, r, k, unpack_chunks(packed)[k], cs, nblobs)  # (raises, saying what)
            # (`_table_key` inlined: this loop runs once per chunk of the image)
            key = packed[off : off + key_end] + packed[off + ix : off + ix_end]
            h = hash(key) & mask
            t = table[h]
            while t and _table_key(records, (t - 1) * size) != key:
                h = (h + 1) & mask
                t = table[h]
            if not t:
                records += packed[off : off + size]
                table[h] = count + 1
                buckets[packed[off]].append(count)
                count += 1
                if count * 2 > len(table):
                    table = _grown(records, count, len(table) * 2)
                    mask = len(table) - 1
            off += size
    del table
    out = bytearray(len(records))
    pos = 0
    for bucket in buckets:
        for i in sorted(bucket, key=lambda i: _sort_key(records, i * CHUNK_RECORD_SIZE)):
            src = i * CHUNK_RECORD_SIZE
            out[pos : pos + CHUNK_RECORD_SIZE] = records[src : src + CHUNK_RECORD_SIZE]
            pos += CHUNK_RECORD_SIZE
    return out


def _table_key(buf: "bytes | bytearray", off: int = 0) -> bytes:
    """What makes a chunk table entry distinct: digest, blob_index and ci_index of a record."""
    return bytes(buf[off : off + _BLOB_INDEX_END]) + bytes(buf[off + _INDEX_AT : off + _INDEX_AT + 4])


def _sort_key(buf: bytearray, off: int) -> bytes:
    blob_index, index = _BLOB_AND_INDEX.unpack_from(buf, off)
    return bytes(buf[off : off + 32]) + CHUNK_SORT_TAIL.pack(blob_index + 1, index)


def _grown(records: bytearray, count: int, cap: int) -> "array[int]":
    table = array("q", bytes(8 * cap))
    mask = cap - 1
    for i in range(count):
        h = hash(_table_key(records, i * CHUNK_RECORD_SIZE)) & mask
        while table[h]:
            h = (h + 1) & mask
        table[h] = i + 1
    return table


def _place_data(buf: bytearray, plan: V6Plan, r: int, pieces: list[bytes], inline_pos: int, data_blk0: int) -> int:
    """Write dir/symlink data blocks; returns i_u (raw_blkaddr of the first full block)."""
    if plan.r_layout[r] == EROFS_INODE_FLAT_INLINE:
        full, tail = pieces[:-1], pieces[-1]
        assert len(tail) < BLOCK
        buf[inline_pos : inline_pos + len(tail)] = tail
    else:
        full = pieces
    if not full:
        return 0
    blk = data_blk0 + plan.r_data_blk[r]
    for i, p in enumerate(full):
        o = (blk + i) * BLOCK
        buf[o : o + len(p)] = p
    return blk


def _check_chunk(plan: V6Plan, r: int, k: int, c: ChunkInfo, cs: int, nblobs: int) -> None:
    dsize = plan.r_dsize[r]
    want = min(cs, dsize - k * cs)
    if c.file_offset != k * cs or c.uncompressed_size != want:
        raise FormatError(
            f"{plan.path(r)!r}: chunk {k} covers [{c.file_offset}, +{c.uncompressed_size}), "
            f"expected [{k * cs}, +{want}) (v6 files are dense chunk arrays)"
        )
    if not 0 <= c.blob_index < nblobs:
        raise FormatError(f"{plan.path(r)!r}: chunk {k} refers to blob {c.blob_index}, image has {nblobs}")
    if c.uncompressed_offset % BLOCK:
        raise FormatError(
            f"{plan.path(r)!r}: chunk {k} uncompressed offset {c.uncompressed_offset:#x} not 4K aligned"
        )
    if not 0 <= c.index < 1 << 24:
        raise FormatError(f"{plan.path(r)!r}: chunk {k} ci_index {c.index} needs more than 24 bits")
    if c.uncompressed_offset // BLOCK > 0xFFFF_FFFF:
        raise FormatError(f"{plan.path(r)!r}: chunk {k} uncompressed offset beyond 16 TiB")
    if int(c.flags) & ~_CHUNK_FLAGS_OK:
        raise FormatError(f"{plan.path(r)!r}: chunk {k} has unknown flags {int(c.flags):#x}")
