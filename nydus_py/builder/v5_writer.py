"""Serialising a build tree to a RAFS v5 bootstrap, spec section 3 (layout as nydus-image writes it).

Two steps, like the v6 writer, so a bad tree is refused before any blob byte is written:

* `plan_v5(root, opts)` validates the tree and assigns inode-table slots the way nydus's
  `Bootstrap::build_rafs` does: root = 1; when a directory is visited all its children take the
  next free slots in byte order of their names, then its sub-directories are visited in that
  order, depth first (spec 3.7).
* `write_v5(plan, blobs, file_chunks, opts)` fills in the bytes once chunks and blobs are known.

Layout of the result (spec 3.1):

    superblock (8192) | inode table u32[slots] | prefetch table u32[inos] | blob table
    | extended blob table (64 B per blob) | inode records, slot order, 8-byte aligned

Records follow slot order, as in the Nydus fixtures (nydus-image 2.1); nydus-image at HEAD writes
them in depth-first pre-order instead. Readers go through the inode table, so both read the same.

Conventions copied from nydus-image: hard links exist for regular files only (every name has its
own slot and full record, chunk list included; all share i_ino = the first name's slot and
i_nlink = the number of names); other objects named twice become separate inodes. Directory
i_size is align(sum(len(name) + 8), 4096) or 4096 when empty, i_blocks = ceil((i_size +
aligned xattr bytes) / 512), directory nlink = 2 + sub-directories, s_inodes_count = distinct
inodes. Inode digests per spec 3.9. Xattr pairs are sorted by name (nydus uses hash-map order).
HAS_HOLE is only set for merged files whose existing chunk lists are not dense; new data never
has holes.
"""

import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..rafs import codec
from ..rafs.constants import ChunkFlags, SuperFlags
from ..rafs.errors import FormatError
from ..rafs.layout_common import CHUNK_RECORD_SIZE, U32, U64, pack_u32s, unpack_chunks
from ..rafs.layout_v5 import (
    BLOB_ENTRY_HEAD,
    EXT_BLOB_ENTRY,
    INODE,
    INODE_RECORD_SIZE,
    MAX_BLOB_ID,
    RAFS_V5_MAGIC,
    RAFS_V5_SUPERBLOCK_SIZE,
    RAFS_V5_VERSION,
    SUPERBLOCK,
    V5_INODE_HAS_HOLE,
    V5_INODE_SYMLINK,
    V5_INODE_XATTR,
    XATTR_NAME_PREFIXES,
    XATTR_NAMES_EXACT,
    align8,
)
from ..rafs.model import BlobInfo, ChunkInfo
from . import plan_common
from .options import BuildOptions
from .tree import FileData, Inode

DIR_PSEUDO_ENTRY = 8  # RAFS_V5_VIRTUAL_ENTRY_SIZE
DIR_MIN_SIZE = 4096
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 0x10000  # nydus RafsXAttrs::add limit
MAX_BOOTSTRAP = 8 << 32  # record offsets are stored >> 3 in u32 slots

_TYPES = frozenset(
    (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)
)
_CHUNK_FLAGS_OK = ChunkFlags.COMPRESSED | ChunkFlags.HAS_CRC32


class _Slot:
    """One inode-table slot: a name of an inode (hard links: several slots, one `primary`)."""

    __slots__ = (
        "inode",
        "path",
        "name",
        "slot",
        "ino",
        "parent",
        "primary",
        "nlink",
        "child_index",
        "child_count",
        "size",
        "xattr",
    )

    def __init__(self, inode: Inode, path: bytes, name: bytes, slot: int, parent: int) -> None:
        self.inode = inode
        self.path = path
        self.name = name
        self.slot = slot
        self.ino = slot
        self.parent = parent
        self.primary: _Slot = self
        self.nlink = 1
        self.child_index = 0
        self.child_count = 0
        self.size = 0
        self.xattr = b""  # encoded xattr table incl. the u64 size header, padded; b"" if none


@dataclass
class V5Plan:
    """A validated tree with slots assigned, ready for `write_v5` once chunks are known."""

    chunk_size: int
    slots: list[_Slot]  # slot order; slots[0] is the root (slot 1)
    inode_count: int  # distinct inodes (s_inodes_count)
    prefetch: list[_Slot] = field(default_factory=list)
    has_xattr: bool = False

    def regular_files(self) -> list[tuple[bytes, Inode]]:
        """(path, inode) of every distinct regular file, slot order."""
        return [(s.path, s.inode) for s in self.slots if s.primary is s and stat.S_ISREG(s.inode.mode)]

    def data_order(self) -> list[Inode]:
        """Files with new data (`FileData`) in blob order, as nydus's `layout_blob_simple` puts
        them for v5: files under a prefetch pattern first (pattern order, then slot order), the
        rest in slot order. Every name of a hard-linked file counts; its first dump writes the data.
        """
        patterns = {s.path: i for i, s in enumerate(self.prefetch)}
        best: dict[int, tuple[tuple[int, int, int], Inode]] = {}
        for seq, s in enumerate(self.slots):
            node = s.inode
            data = node.data
            if not stat.S_ISREG(node.mode) or not isinstance(data, FileData) or data.size == 0:
                continue
            idx = plan_common.match_pattern(s.path, patterns) if patterns else None
            key = (1, 0, seq) if idx is None else (0, idx, seq)
            cur = best.get(id(node))
            if cur is None or key < cur[0]:
                best[id(node)] = (key, node)
        return [node for _key, node in sorted(best.values(), key=lambda t: t[0])]


def encode_xattrs_v5(xattrs: Mapping[bytes, bytes], path: bytes = b"?") -> bytes:
    """The v5 xattr table (u64 content size, pairs sorted by name, padded to 8); b'' if none."""
    if not xattrs:
        return b""
    body = bytearray()
    for name in sorted(xattrs):
        value = xattrs[name]
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise FormatError(f"{path!r}: xattr names and values must be bytes")
        if not (
            name in XATTR_NAMES_EXACT
            or any(name.startswith(p) and len(name) > len(p) for p in XATTR_NAME_PREFIXES)
        ):
            raise FormatError(
                f"{path!r}: xattr {name!r} not storable in RAFS "
                "(allowed: user.*, trusted.*, security.*, system.posix_acl_access/default)"
            )
        if len(name) > MAX_XATTR_NAME or b"\0" in name:
            raise FormatError(
                f"{path!r}: xattr name {name[:80]!r} longer than {MAX_XATTR_NAME} bytes or has NUL"
            )
        if len(value) > MAX_XATTR_VALUE:
            raise FormatError(
                f"{path!r}: xattr {name!r} value of {len(value)} bytes exceeds {MAX_XATTR_VALUE}"
            )
        body += U32.pack(len(name) + 1 + len(value)) + name + b"\0" + value
    out = U64.pack(len(body)) + body
    return out + b"\0" * (-len(out) % 8)


def dir_size_v5(names: Sequence[bytes]) -> int:
    """nydus's pseudo i_size of a v5 directory with children `names` (spec 3.10)."""
    total = sum(len(n) + DIR_PSEUDO_ENTRY for n in names)
    return (total + DIR_MIN_SIZE - 1) // DIR_MIN_SIZE * DIR_MIN_SIZE if total else DIR_MIN_SIZE


def plan_v5(root: Inode, opts: BuildOptions) -> V5Plan:
    """Validate `root` and assign slots; FormatError names the first offending path."""
    cs = plan_common.check_root(root, opts)

    root_slot = _Slot(root, b"/", b"/", 1, 0)
    slots: list[_Slot] = [root_slot]
    seen_dirs = {id(root)}
    files: dict[int, _Slot] = {}  # id(regular-file Inode) -> its first slot
    stack = [root_slot]
    while stack:
        d = stack.pop()
        kids = d.inode.children or {}
        d.child_index = len(slots) + 1
        d.child_count = len(kids)
        subdirs: list[_Slot] = []
        for name in kids:
            plan_common.check_name(name, d.path)  # before sorting: a str name must not raise TypeError
        for name in sorted(kids):
            child = kids[name]
            path = plan_common.join(d.path, name)
            if not isinstance(child, Inode):
                raise FormatError(f"{path!r}: not an Inode")
            s = _Slot(child, path, name, len(slots) + 1, d.slot)
            slots.append(s)
            if child.is_dir:
                if id(child) in seen_dirs:
                    raise FormatError(f"{path!r}: directory linked twice (hard-linked dir or loop)")
                seen_dirs.add(id(child))
                subdirs.append(s)
            elif child.is_reg:
                first = files.get(id(child))
                if first is None:
                    files[id(child)] = s
                else:
                    s.primary, s.ino = first, first.slot
                    first.nlink += 1
        d.nlink = 2 + len(subdirs)
        stack.extend(reversed(subdirs))
    if len(slots) > 0xFFFF_FFFF:
        raise FormatError(f"{len(slots)} names do not fit a v5 inode table")

    has_xattr = False
    for s in slots:
        if s.primary is not s:
            continue
        node, path = s.inode, s.path
        fmt = stat.S_IFMT(node.mode) if isinstance(node.mode, int) else -1
        if fmt not in _TYPES or not 0 <= node.mode <= 0o177777:
            raise FormatError(f"{path!r}: unsupported file type in mode {node.mode!r}")
        if fmt != stat.S_IFDIR and node.children:
            raise FormatError(f"{path!r}: only directories can have children")
        plan_common.check_attrs(path, node)
        if fmt in (stat.S_IFCHR, stat.S_IFBLK) and not (
            isinstance(node.rdev, int) and 0 <= node.rdev <= 0xFFFF_FFFF
        ):
            raise FormatError(f"{path!r}: device number {node.rdev!r} does not fit v5's 32-bit i_rdev")
        s.xattr = encode_xattrs_v5(node.xattrs, path)
        has_xattr = has_xattr or bool(s.xattr)
        if fmt == stat.S_IFDIR:
            s.size = dir_size_v5(list((node.children or {}).keys()))
        elif fmt == stat.S_IFLNK:
            s.size = plan_common.symlink_size(path, node)
        elif fmt == stat.S_IFREG:
            s.size = plan_common.file_size(path, node, limit=1 << 63)
    for s in slots:
        if s.primary is not s:
            s.size, s.xattr = s.primary.size, s.primary.xattr

    plan = V5Plan(cs, slots, sum(1 for s in slots if s.primary is s), has_xattr=has_xattr)
    plan.prefetch = _resolve_prefetch(slots, opts.prefetch_paths)
    return plan


def _resolve_prefetch(slots: list[_Slot], paths: Sequence[bytes]) -> list[_Slot]:
    """Slots named by absolute prefetch paths, in the given order; paths that are relative,
    missing or covered by an earlier one are dropped (nydus warns and goes on)."""
    chosen: list[bytes] = []
    out: list[_Slot] = []
    for raw in paths:
        got = plan_common.prefetch_path(raw, chosen)
        if isinstance(got, str):
            continue
        norm, parts = got
        cur: _Slot | None = slots[0]
        for comp in parts:
            kids = cur.inode.children if cur is not None and cur.inode.is_dir else None
            if not kids or comp not in kids:
                cur = None
                break
            assert cur is not None
            cur = slots[cur.child_index - 1 + sorted(kids).index(comp)]
        if cur is None:
            continue
        chosen.append(norm)
        out.append(cur)
    return out


def check_chunks(
    path: bytes, size: int, chunks: Sequence[ChunkInfo], blobs: Sequence[BlobInfo], opts: BuildOptions
) -> bool:
    """Validate one file's chunk list (file order) for a v5 image; True if it needs HAS_HOLE.

    v5 has one compressor, digester and chunk size for the whole image: a chunk is only usable
    if its blob was written with the image's digester and chunk size, and a compressed chunk
    only if its blob uses the image's compressor.
    """
    cs = opts.chunk_size
    dense = len(chunks) == (size + cs - 1) // cs
    prev_end = 0
    for k, c in enumerate(chunks):
        where = f"{path!r}: chunk {k}"
        if not 0 <= c.blob_index < len(blobs):
            raise FormatError(f"{where} refers to blob {c.blob_index}, the image has {len(blobs)}")
        blob = blobs[c.blob_index]
        if blob.chunk_size != cs:
            raise FormatError(
                f"{where}: blob {blob.blob_id} has chunk size {blob.chunk_size:#x}, the image uses {cs:#x}"
            )
        if blob.digester != opts.digester:
            raise FormatError(
                f"{where}: blob {blob.blob_id} uses {blob.digester.nydus_name} digests, "
                f"the v5 image {opts.digester.nydus_name}"
            )
        if c.flags & ~_CHUNK_FLAGS_OK:
            raise FormatError(f"{where} has flags {int(c.flags):#x} RAFS v5 cannot express")
        if c.flags & ChunkFlags.COMPRESSED and blob.compressor != opts.compressor:
            raise FormatError(
                f"{where}: compressed with {blob.compressor.nydus_name}, "
                f"the v5 image's only compressor is {opts.compressor.nydus_name}"
            )
        if len(c.digest) != 32:
            raise FormatError(f"{where} has a {len(c.digest)}-byte digest")
        if not 0 < c.uncompressed_size <= cs or not 0 < c.compressed_size <= 2 * cs:
            raise FormatError(
                f"{where} has sizes {c.compressed_size}/{c.uncompressed_size} for chunk size {cs:#x}"
            )
        for label, v, bits in (
            ("compressed offset", c.compressed_offset, 64),
            ("uncompressed offset", c.uncompressed_offset, 64),
            ("index", c.index, 32),
            ("crc32", c.crc32, 32),
        ):
            if not 0 <= v < 1 << bits:
                raise FormatError(f"{where}: {label} {v} out of range")
        if c.file_offset < prev_end or c.file_offset + c.uncompressed_size > size:
            raise FormatError(
                f"{where} at [{c.file_offset}, +{c.uncompressed_size}) overlaps the previous chunk "
                f"or runs past the file size {size}"
            )
        prev_end = c.file_offset + c.uncompressed_size
        if c.file_offset != k * cs or c.uncompressed_size != min(cs, size - k * cs):
            dense = False
    return not dense


def _blob_table(blobs: Sequence[BlobInfo]) -> bytes:
    """readahead offset/size + id per blob, NUL-separated, padded to 8 (spec 3.5)."""
    parts = []
    for i, b in enumerate(blobs):
        raw = b.blob_id.encode() if b.blob_id.isascii() else b""
        if (
            not 0 < len(raw) <= MAX_BLOB_ID
            or not all(0x21 <= ch < 0x7F for ch in raw)
            or raw in (b".", b"..")
        ):
            raise FormatError(
                f"blob {i}: id {b.blob_id!r} must be 1..{MAX_BLOB_ID} printable ASCII characters"
            )
        if b"/" in raw:
            raise FormatError(f"blob {i}: id {b.blob_id!r} contains '/'")
        if not (0 <= b.readahead_offset <= 0xFFFF_FFFF and 0 <= b.readahead_size <= 0xFFFF_FFFF):
            raise FormatError(f"blob {b.blob_id}: readahead range does not fit u32")
        parts.append(BLOB_ENTRY_HEAD.pack(b.readahead_offset, b.readahead_size) + raw)
    out = b"\0".join(parts)
    return out + b"\0" * (-len(out) % 8)


def write_v5(
    plan: V5Plan,
    blobs: Sequence[BlobInfo],
    file_chunks: Callable[[Inode], bytes],
    opts: BuildOptions,
) -> bytes:
    """The bootstrap bytes. `file_chunks(inode)` is every regular file's chunk list in file
    order as packed records (already the on-disk form), `blob_index` relative to `blobs` (the
    image's blob table, in order)."""
    slots = plan.slots
    n = len(slots)
    digester = opts.digester
    explicit = not opts.repeatable

    # chunk lists, hole flags and inode digests (children have higher slots: reverse order works)
    chunk_recs: dict[int, bytes] = {}
    holes: dict[int, bool] = {}
    nchunks: dict[int, int] = {}
    digests: list[bytes] = [b""] * n
    for s in reversed(slots):
        node = s.inode
        mode = node.mode
        if stat.S_ISREG(mode):
            key = id(node)
            if key not in chunk_recs:
                packed = file_chunks(node) if s.size else b""
                chunks = unpack_chunks(packed)
                holes[key] = check_chunks(s.path, s.size, chunks, blobs, opts)
                nchunks[key] = len(chunks)
                chunk_recs[key] = packed
            recs = chunk_recs[key]
            ids = b"".join(recs[i : i + 32] for i in range(0, len(recs), CHUNK_RECORD_SIZE))
            digests[s.slot - 1] = codec.digest(digester, ids)
        elif stat.S_ISLNK(mode):
            digests[s.slot - 1] = codec.digest(digester, node.symlink or b"")
        elif stat.S_ISDIR(mode):
            kids = digests[s.child_index - 1 : s.child_index - 1 + s.child_count]
            digests[s.slot - 1] = codec.digest(digester, b"".join(kids))
        else:
            digests[s.slot - 1] = codec.digest(digester, b"")

    itab_off = RAFS_V5_SUPERBLOCK_SIZE
    itab_size = align8(4 * n)
    ptab_off = itab_off + itab_size
    inos = [s.ino for s in plan.prefetch]
    ptab = pack_u32s(inos)
    ptab += b"\0" * (-len(ptab) % 8)
    btab_off = ptab_off + len(ptab)
    btab = _blob_table(blobs)
    ext_off = btab_off + len(btab)
    ext = bytearray()
    for b in blobs:
        if not (0 <= b.chunk_count <= 0xFFFF_FFFF and 0 <= int(b.features) <= 0xFFFF_FFFF):
            raise FormatError(f"blob {b.blob_id}: chunk count / features out of range")
        ext += EXT_BLOB_ENTRY.pack(b.chunk_count, int(b.features), b.uncompressed_size, b.compressed_size)
    rec_off = ext_off + len(ext)

    table = bytearray(itab_size)
    records = bytearray()
    for s in slots:
        p = s.primary
        node = p.inode
        mode = node.mode
        off = rec_off + len(records)
        if off + INODE_RECORD_SIZE >= MAX_BOOTSTRAP:
            raise FormatError(f"bootstrap would exceed {MAX_BOOTSTRAP} bytes; RAFS v5 cannot address it")
        U32.pack_into(table, 4 * (s.slot - 1), off >> 3)
        flags = 0
        child_index = child_count = rdev = 0
        symlink = b""
        if stat.S_ISDIR(mode):
            child_index, child_count = s.child_index, s.child_count
        elif stat.S_ISREG(mode):
            child_count = nchunks[id(node)]
            if holes[id(node)]:
                flags |= V5_INODE_HAS_HOLE
        elif stat.S_ISLNK(mode):
            symlink = node.symlink or b""
            flags |= V5_INODE_SYMLINK
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            rdev = node.rdev
        if p.xattr:
            flags |= V5_INODE_XATTR
        xattr_bytes = align8(U64.unpack_from(p.xattr)[0]) if p.xattr else 0
        records += INODE.pack(
            digests[s.slot - 1],
            s.parent,
            s.ino,
            node.uid if explicit else 0,
            node.gid if explicit else 0,
            0,
            mode,
            p.size,
            (p.size + xattr_bytes + 511) // 512,
            flags,
            p.nlink,
            child_index,
            child_count,
            len(s.name),
            len(symlink),
            rdev,
            node.mtime_nsec,
            node.mtime,
        )
        records += s.name + b"\0" * (-len(s.name) % 8)
        if symlink:
            records += symlink + b"\0" * (-len(symlink) % 8)
        records += p.xattr
        if stat.S_ISREG(mode):
            records += chunk_recs[id(node)]
    if rec_off + len(records) >= MAX_BOOTSTRAP:
        raise FormatError(f"bootstrap would exceed {MAX_BOOTSTRAP} bytes; RAFS v5 cannot address it")

    flags = SuperFlags.for_algorithms(opts.compressor, digester)
    if explicit:
        flags |= SuperFlags.EXPLICIT_UID_GID
    if plan.has_xattr:
        flags |= SuperFlags.HAS_XATTR
    sb = bytearray(RAFS_V5_SUPERBLOCK_SIZE)
    SUPERBLOCK.pack_into(
        sb,
        0,
        RAFS_V5_MAGIC,
        RAFS_V5_VERSION,
        RAFS_V5_SUPERBLOCK_SIZE,
        plan.chunk_size,
        int(flags),
        plan.inode_count,
        itab_off,
        ptab_off,
        btab_off,
        n,
        len(inos),
        len(btab),
        len(blobs),
        ext_off,
    )
    return b"".join((sb, table, ptab, btab, ext, records))  # one copy, not five
