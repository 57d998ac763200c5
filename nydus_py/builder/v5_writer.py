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
from array import array
from collections.abc import Callable, Mapping, Sequence

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
from .packed import K_SYMLINK, Children, Tree, as_tree
from .tree import Inode

DIR_PSEUDO_ENTRY = 8  # RAFS_V5_VIRTUAL_ENTRY_SIZE
DIR_MIN_SIZE = 4096
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 0x10000  # nydus RafsXAttrs::add limit
MAX_BOOTSTRAP = 8 << 32  # record offsets are stored >> 3 in u32 slots

_TYPES = frozenset(
    (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)
)
_CHUNK_FLAGS_OK = ChunkFlags.COMPRESSED | ChunkFlags.HAS_CRC32


class V5Plan:
    """A validated tree with slots assigned, ready for `write_v5` once chunks are known.

    One inode-table slot per name (hard links: several slots, one primary), slot order, kept
    as array columns rather than an object per slot: `s_entry` is the tree entry of the name,
    `s_node` the entry holding the inode's attributes.
    """

    def __init__(self, tree: Tree, chunk_size: int) -> None:
        self.tree = tree
        self.chunk_size = chunk_size
        self.s_entry = array("i")
        self.s_node = array("i")
        self.s_parent = array("I")  # parent's slot number (root: 0)
        self.s_primary = array("I")  # index (0-based) of the slot holding the inode's record
        self.s_nlink = array("I")
        self.s_child_index = array("I")
        self.s_child_count = array("I")
        self.s_size = array("Q")
        self.s_xlen = array("I")  # encoded xattr table length (0: none)
        self.inode_count = 0  # distinct inodes (s_inodes_count)
        self.prefetch: list[int] = []  # slot indexes
        self.has_xattr = False

    def __len__(self) -> int:
        return len(self.s_entry)

    def path(self, s: int) -> bytes:
        return self.tree.path(self.s_entry[s])

    def _new(self, entry: int, node: int, parent: int) -> int:
        s = len(self.s_entry)
        self.s_entry.append(entry)
        self.s_node.append(node)
        self.s_parent.append(parent)
        self.s_primary.append(s)
        self.s_nlink.append(1)
        self.s_child_index.append(0)
        self.s_child_count.append(0)
        self.s_size.append(0)
        self.s_xlen.append(0)
        return s

    def regular_files(self) -> "array[int]":
        """Inode entries of every distinct regular file, slot order."""
        mode, node, prim = self.tree.mode, self.s_node, self.s_primary
        return array("i", (node[s] for s in range(len(node)) if prim[s] == s and stat.S_ISREG(mode[node[s]])))

    def data_order(self) -> "array[int]":
        """Inode entries of files with new data in blob order, as nydus's `layout_blob_simple`
        puts them for v5: files under a prefetch pattern first (pattern order, then slot order),
        the rest in slot order. Every name of a hard-linked file counts; its first dump writes
        the data."""
        tree = self.tree
        patterns = {self.path(s): i for i, s in enumerate(self.prefetch)}
        if not patterns:  # slot order of each inode's primary slot (its first name)
            prim, node = self.s_primary, self.s_node
            return array(
                "i",
                (
                    node[s]
                    for s in range(len(node))
                    if prim[s] == s and stat.S_ISREG(tree.mode[node[s]]) and tree.has_new_data(node[s]) and tree.size[node[s]]
                ),
            )
        best: dict[int, tuple[int, int, int]] = {}
        for seq in range(len(self.s_node)):
            n = self.s_node[seq]
            if not stat.S_ISREG(tree.mode[n]) or not tree.has_new_data(n) or tree.size[n] == 0:
                continue
            idx = plan_common.match_pattern(self.path(seq), patterns)
            key = (1, 0, seq) if idx is None else (0, idx, seq)
            cur = best.get(n)
            if cur is None or key < cur:
                best[n] = key
        return array("i", [n for n, _key in sorted(best.items(), key=lambda t: t[1])])


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


def plan_v5(root: "Tree | Inode", opts: BuildOptions) -> V5Plan:
    """Validate `root` and assign slots; FormatError names the first offending path."""
    tree = as_tree(root)
    cs = plan_common.check_root(tree.is_dir(0), opts)
    plan = V5Plan(tree, cs)
    ch = tree.children()
    mode = tree.mode
    first = array("i", [-1]) * len(tree)  # regular-file inode entry -> its first slot
    plan._new(0, 0, 0)
    stack = [0]
    while stack:
        d = stack.pop()
        e = plan.s_node[d]
        kids = ch.of(e)
        plan.s_child_index[d] = len(plan) + 1
        plan.s_child_count[d] = len(kids)
        dpath: bytes | None = None
        subdirs: list[int] = []
        for c in kids:
            name = tree.name(c)
            if not name or len(name) > plan_common.MAX_NAME or b"/" in name or b"\0" in name or name in (b".", b".."):
                dpath = dpath or tree.path(e)
                plan_common.check_name(name, dpath)
            n = tree.resolve(c)
            s = plan._new(c, n, d + 1)
            if stat.S_ISDIR(mode[n]):
                subdirs.append(s)
            elif stat.S_ISREG(mode[n]):
                f = first[n]
                if f < 0:
                    first[n] = s
                else:
                    plan.s_primary[s] = f
                    plan.s_nlink[f] += 1
        plan.s_nlink[d] = 2 + len(subdirs)
        stack.extend(reversed(subdirs))
    del first
    if len(plan) > 0xFFFF_FFFF:
        raise FormatError(f"{len(plan)} names do not fit a v5 inode table")

    has_xattr = False
    count = 0
    for s in range(len(plan)):
        if plan.s_primary[s] != s:
            continue
        count += 1
        n = plan.s_node[s]
        m = mode[n]
        fmt = stat.S_IFMT(m)
        if fmt not in _TYPES or not 0 <= m <= 0o177777:
            raise FormatError(f"{plan.path(s)!r}: unsupported file type in mode {m!r}")
        if tree.nsec[n] > 999_999_999:
            raise FormatError(f"{plan.path(s)!r}: mtime_nsec {tree.nsec[n]} out of range")
        if fmt in (stat.S_IFCHR, stat.S_IFBLK) and tree.rdev(n) > 0xFFFF_FFFF:
            raise FormatError(f"{plan.path(s)!r}: device number {tree.rdev(n)!r} does not fit v5's 32-bit i_rdev")
        if tree.xlen[n]:
            plan.s_xlen[s] = len(encode_xattrs_v5(tree.xattrs(n), plan.path(s)))
            has_xattr = has_xattr or bool(plan.s_xlen[s])
        if fmt == stat.S_IFDIR:
            plan.s_size[s] = dir_size_v5([tree.name(c) for c in ch.of(n)])
        elif fmt == stat.S_IFLNK:
            size = tree.b[n] if tree.kind[n] == K_SYMLINK else 0
            if not 0 < size <= plan_common.MAX_SYMLINK or b"\0" in tree.symlink(n):
                raise FormatError(
                    f"{plan.path(s)!r}: symlink target must be 1..{plan_common.MAX_SYMLINK} bytes without NUL"
                )
            plan.s_size[s] = size
        elif fmt == stat.S_IFREG:
            size = tree.size[n]
            if size >= 1 << 63:
                raise FormatError(f"{plan.path(s)!r}: bad file size {size!r}")
            plan.s_size[s] = size
    for s in range(len(plan)):
        p = plan.s_primary[s]
        if p != s:
            plan.s_size[s], plan.s_xlen[s] = plan.s_size[p], plan.s_xlen[p]

    plan.inode_count, plan.has_xattr = count, has_xattr
    plan.prefetch = _resolve_prefetch(plan, ch, opts.prefetch_paths)
    return plan


def _resolve_prefetch(plan: V5Plan, ch: Children, paths: Sequence[bytes]) -> list[int]:
    """Slots named by absolute prefetch paths, in the given order; paths that are relative,
    missing or covered by an earlier one are dropped (nydus warns and goes on)."""
    tree = plan.tree
    chosen: list[bytes] = []
    out: list[int] = []
    for raw in paths:
        got = plan_common.prefetch_path(raw, chosen)
        if isinstance(got, str):
            continue
        norm, parts = got
        cur = 0
        for comp in parts:
            n = plan.s_node[cur]
            if not stat.S_ISDIR(tree.mode[n]):
                cur = -1
                break
            kids = ch.of(n)
            k = next((k for k, c in enumerate(kids) if tree.name(c) == comp), -1)
            if k < 0:
                cur = -1
                break
            cur = plan.s_child_index[cur] - 1 + k
        if cur < 0:
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
    file_chunks: Callable[[int], bytes],
    opts: BuildOptions,
) -> bytes:
    """The bootstrap bytes. `file_chunks(entry)` is every regular file's chunk list in file
    order as packed records (already the on-disk form), `blob_index` relative to `blobs` (the
    image's blob table, in order)."""
    tree = plan.tree
    n = len(plan)
    digester = opts.digester
    explicit = not opts.repeatable
    mode = tree.mode

    # hole flags, chunk counts and inode digests (children have higher slots: reverse order works)
    holes = array("B", bytes(len(tree)))
    nchunks = array("I", bytes(4 * len(tree)))
    checked = array("B", bytes(len(tree)))
    digests = bytearray(32 * n)
    for s in range(n - 1, -1, -1):
        node = plan.s_node[s]
        m = mode[node]
        if stat.S_ISREG(m):
            size = plan.s_size[s]
            recs = file_chunks(node) if size else b""
            if not checked[node]:
                chunks = unpack_chunks(recs)
                holes[node] = check_chunks(plan.path(s), size, chunks, blobs, opts)
                nchunks[node] = len(chunks)
                checked[node] = 1
            ids = b"".join(recs[i : i + 32] for i in range(0, len(recs), CHUNK_RECORD_SIZE))
            d = codec.digest(digester, ids)
        elif stat.S_ISLNK(m):
            d = codec.digest(digester, tree.symlink(node))
        elif stat.S_ISDIR(m):
            ci = plan.s_child_index[s] - 1
            d = codec.digest(digester, bytes(digests[32 * ci : 32 * (ci + plan.s_child_count[s])]))
        else:
            d = codec.digest(digester, b"")
        digests[32 * s : 32 * s + 32] = d
    del checked

    itab_off = RAFS_V5_SUPERBLOCK_SIZE
    itab_size = align8(4 * n)
    ptab_off = itab_off + itab_size
    inos = [plan.s_primary[s] + 1 for s in plan.prefetch]
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
    for s in range(n):
        p = plan.s_primary[s]
        node = plan.s_node[s]
        entry = plan.s_entry[s]
        m = mode[node]
        off = rec_off + len(records)
        if off + INODE_RECORD_SIZE >= MAX_BOOTSTRAP:
            raise FormatError(f"bootstrap would exceed {MAX_BOOTSTRAP} bytes; RAFS v5 cannot address it")
        U32.pack_into(table, 4 * s, off >> 3)
        flags = 0
        child_index = child_count = rdev = 0
        symlink = b""
        if stat.S_ISDIR(m):
            child_index, child_count = plan.s_child_index[s], plan.s_child_count[s]
        elif stat.S_ISREG(m):
            child_count = nchunks[node]
            if holes[node]:
                flags |= V5_INODE_HAS_HOLE
        elif stat.S_ISLNK(m):
            symlink = tree.symlink(node)
            flags |= V5_INODE_SYMLINK
        elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
            rdev = tree.rdev(node)
        xattr = encode_xattrs_v5(tree.xattrs(node)) if plan.s_xlen[p] else b""
        if xattr:
            flags |= V5_INODE_XATTR
        xattr_bytes = align8(U64.unpack_from(xattr)[0]) if xattr else 0
        size = plan.s_size[p]
        name = b"/" if s == 0 else tree.name(entry)
        records += INODE.pack(
            bytes(digests[32 * s : 32 * s + 32]),
            plan.s_parent[s],
            p + 1,
            tree.uid[node] if explicit else 0,
            tree.gid[node] if explicit else 0,
            0,
            m,
            size,
            (size + xattr_bytes + 511) // 512,
            flags,
            plan.s_nlink[p],
            child_index,
            child_count,
            len(name),
            len(symlink),
            rdev,
            tree.nsec[node],
            tree.mtime[node],
        )
        records += name + b"\0" * (-len(name) % 8)
        if symlink:
            records += symlink + b"\0" * (-len(symlink) % 8)
        records += xattr
        if stat.S_ISREG(m):
            records += file_chunks(node) if size else b""
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
