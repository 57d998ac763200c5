"""A tiny RAFS v5 writer for tests: hand-built bootstraps with features no fixture has
(xattrs, holes, devices, huge directories) and raw field patching for hostile cases.

It follows the builder's conventions (spec 3.1-3.10): slots assigned per directory in name order,
then sub-directories depth-first; hard links get their own slot and the primary's i_ino; inode
digests per 3.9. File data goes uncompressed into one blob returned alongside the bootstrap.
"""

import hashlib
import stat
import struct
from dataclasses import dataclass, field

from nydus_py.rafs.constants import SuperFlags
from nydus_py.rafs.layout_v5 import (
    RAFS_V5_MAGIC,
    RAFS_V5_VERSION,
    V5_INODE_HAS_HOLE,
    V5_INODE_SYMLINK,
    V5_INODE_XATTR,
)

SB = 8192
DEFAULT_FLAGS = SuperFlags.COMPRESSION_NONE | SuperFlags.HASH_SHA256 | SuperFlags.EXPLICIT_UID_GID


@dataclass(eq=False)
class Node:
    name: bytes
    mode: int
    children: list["Node"] = field(default_factory=list)
    target: bytes = b""
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytes = b""
    # HAS_HOLE files: explicit (file_offset, bytes) chunks and size.
    holes: list[tuple[int, bytes]] | None = None
    size: int | None = None
    link: "Node | None" = None
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    mtime: int = 0
    # filled by build()
    slot: int = 0
    parent_slot: int = 0
    child_index: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def d(name: bytes, *children: Node, mode: int = 0o755, **kw: object) -> Node:
    return Node(name, stat.S_IFDIR | mode, list(children), **kw)  # type: ignore[arg-type]


def f(name: bytes, data: bytes = b"", mode: int = 0o644, **kw: object) -> Node:
    return Node(name, stat.S_IFREG | mode, data=data, **kw)  # type: ignore[arg-type]


def ln(name: bytes, target: bytes) -> Node:
    return Node(name, stat.S_IFLNK | 0o777, target=target)


def hardlink(name: bytes, primary: Node) -> Node:
    return Node(name, primary.mode, link=primary)


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 8)


def build(
    root: Node,
    chunk_size: int = 4096,
    flags: int = DEFAULT_FLAGS,
    blob_id: str = "ab" * 32,
    prefetch: list[int] | None = None,
    extra_blobs: list[str] | None = None,
    ext_table: bool = True,
    root_name: bytes = b"/",
) -> tuple[bytes, bytes]:
    """(bootstrap, blob) for the tree under `root` (root.name is ignored; the root record is
    named `root_name`: "/" as nydus-image writes it now, b"" as older versions did).

    All data goes to the first blob; `extra_blobs` only add (empty) blob table entries.
    """
    slots: list[Node] = [root]
    root.slot, root.parent_slot = 1, 0

    def assign(dnode: Node) -> None:
        kids = sorted(dnode.children, key=lambda n: n.name)
        dnode.child_index = len(slots) + 1
        for k in kids:
            slots.append(k)
            k.slot, k.parent_slot = len(slots), dnode.slot
        for k in kids:
            if k.is_dir:
                assign(k)

    assign(root)

    def primary(n: Node) -> Node:
        return n.link if n.link is not None else n

    links: dict[int, int] = {}
    for n in slots:
        links[id(primary(n))] = links.get(id(primary(n)), 0) + 1

    blob = bytearray()
    chunk_recs: dict[int, list[bytes]] = {}  # per primary node: 80-byte records
    chunk_ids: dict[int, list[bytes]] = {}

    def chunk_rec(data: bytes, file_offset: int) -> tuple[bytes, bytes]:
        digest = hashlib.sha256(data).digest()
        off = len(blob)
        blob.extend(data)
        rec = struct.pack("<32sIIIIQQQII", digest, 0, 0, len(data), len(data), off, off, file_offset, 0, 0)
        return rec, digest

    for n in slots:
        if n.link is not None or not stat.S_ISREG(n.mode):
            continue
        pieces = (
            n.holes
            if n.holes is not None
            else [(o, n.data[o : o + chunk_size]) for o in range(0, len(n.data), chunk_size)]
        )
        recs, digests_ = [], []
        for off, data in pieces:
            r, i = chunk_rec(data, off)
            recs.append(r)
            digests_.append(i)
        chunk_recs[id(n)], chunk_ids[id(n)] = recs, digests_

    digests: dict[int, bytes] = {}

    def digest_of(n: Node) -> bytes:
        p = primary(n)
        if id(p) in digests:
            return digests[id(p)]
        if stat.S_ISREG(p.mode):
            h = hashlib.sha256(b"".join(chunk_ids[id(p)])).digest()
        elif stat.S_ISLNK(p.mode):
            h = hashlib.sha256(p.target).digest()
        elif p.is_dir:
            kids = sorted(p.children, key=lambda k: k.name)
            h = hashlib.sha256(b"".join(digest_of(k) for k in kids)).digest()
        else:
            h = hashlib.sha256(b"").digest()
        digests[id(p)] = h
        return h

    n_slots = len(slots)
    itab_size = len(_pad(b"\0" * 4 * n_slots))
    prefetch = prefetch or []
    ptab = _pad(struct.pack(f"<{len(prefetch)}I", *prefetch))
    ids: list[str] = [blob_id, *(extra_blobs or [])]
    btab = _pad(b"\0".join(struct.pack("<II", 512 * i, 4096 * i) + bid.encode() for i, bid in enumerate(ids)))
    nchunks = sum(len(r) for r in chunk_recs.values())
    ext = (
        b"".join(
            struct.pack(
                "<IIQQ", nchunks if i == 0 else 0, 0, len(blob) if i == 0 else 0, len(blob) if i == 0 else 0
            )
            + b"\0" * 40
            for i in range(len(ids))
        )
        if ext_table
        else b""
    )
    itab_off = SB
    ptab_off = itab_off + itab_size
    btab_off = ptab_off + len(ptab)
    ext_off = btab_off + len(btab)
    pos = ext_off + len(ext)

    records = bytearray()
    table: list[int] = []
    for n in slots:
        p = primary(n)
        name = root_name if n is root else n.name
        iflags = 0
        tail = _pad(name)
        if stat.S_ISLNK(p.mode):
            iflags |= V5_INODE_SYMLINK
            tail += _pad(p.target)
        if p.xattrs:
            iflags |= V5_INODE_XATTR
            body = b"".join(struct.pack("<I", len(k) + 1 + len(v)) + k + b"\0" + v for k, v in p.xattrs)
            tail += _pad(struct.pack("<Q", len(body)) + body)
        count = 0
        size = 0
        if stat.S_ISREG(p.mode):
            recs = chunk_recs[id(p)]
            tail += b"".join(recs)
            count = len(recs)
            size = p.size if p.size is not None else len(p.data)
            if p.holes is not None:
                iflags |= V5_INODE_HAS_HOLE
        elif p.is_dir:
            count = len(p.children)
            size = 4096
        elif stat.S_ISLNK(p.mode):
            size = len(p.target)
        nlink = 2 + sum(1 for k in p.children if k.is_dir) if p.is_dir else links[id(p)]
        hdr = struct.pack(
            "<32sQQIIIIQQQIIIHHIIQ8x",
            digest_of(n),
            n.parent_slot,
            p.slot,
            p.uid,
            p.gid,
            0,
            p.mode,
            size,
            (size + 511) // 512,
            iflags,
            nlink,
            p.child_index if p.is_dir else 0,
            count,
            len(name),
            len(p.target) if stat.S_ISLNK(p.mode) else 0,
            p.rdev,
            0,
            p.mtime,
        )
        table.append((pos + len(records)) >> 3)
        records += hdr + tail

    sb = struct.pack(
        "<IIIIQQQQQIIIIQ",
        RAFS_V5_MAGIC,
        RAFS_V5_VERSION,
        SB,
        chunk_size,
        int(flags),
        len({id(primary(n)) for n in slots}),
        itab_off,
        ptab_off,
        btab_off,
        n_slots,
        len(prefetch),
        len(btab),
        len(ids) if ext_table else 0,
        ext_off if ext_table else 0,
    )
    out = bytearray(sb.ljust(SB, b"\0"))
    out += _pad(struct.pack(f"<{n_slots}I", *table))
    out += ptab + btab + ext + records
    return bytes(out), bytes(blob)


# ---------------------------------------------------------------- raw patching of bootstraps

# RafsV5Inode field offsets (spec 3.6)
F_DIGEST, F_PARENT, F_INO, F_UID, F_GID, F_MODE, F_SIZE, F_BLOCKS, F_FLAGS = 0, 32, 40, 48, 52, 60, 64, 72, 80
F_NLINK, F_CHILD_INDEX, F_CHILD_COUNT, F_NAME_SIZE, F_SYMLINK_SIZE = 88, 92, 96, 100, 102
# superblock field offsets (spec 3.2)
S_SB_SIZE, S_BLOCK_SIZE, S_FLAGS, S_INODES_COUNT, S_ITAB_OFF = 8, 12, 16, 24, 32
S_PTAB_OFF, S_BTAB_OFF, S_ITAB_ENTRIES, S_PTAB_ENTRIES, S_BTAB_SIZE, S_EXT_ENTRIES, S_EXT_OFF = (
    40, 48, 56, 60, 64, 68, 72,
)  # fmt: skip


def record_offset(boot: bytes, slot: int) -> int:
    itab = struct.unpack_from("<Q", boot, S_ITAB_OFF)[0]
    return struct.unpack_from("<I", boot, itab + 4 * (slot - 1))[0] << 3


def slot_of(boot: bytes, name: bytes) -> int:
    """First slot whose record name is `name` (for picking targets in patch tests)."""
    entries = struct.unpack_from("<I", boot, S_ITAB_ENTRIES)[0]
    for slot in range(1, entries + 1):
        off = record_offset(boot, slot)
        size = struct.unpack_from("<H", boot, off + F_NAME_SIZE)[0]
        if boot[off + 128 : off + 128 + size] == name:
            return slot
    raise KeyError(name)


def patch(boot: bytes, offset: int, fmt: str, value: int | bytes) -> bytes:
    out = bytearray(boot)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def patch_record(boot: bytes, slot: int, field_off: int, fmt: str, value: int | bytes) -> bytes:
    return patch(boot, record_offset(boot, slot) + field_off, fmt, value)
