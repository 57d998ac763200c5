"""A small, independent RAFS v6 encoder for reader tests (not the project's builder).

Written straight from shared/specs/RAFS-FORMAT.md sections 4, 5 and 9 so the reader can be tested
without Nydus files; `Built` records where every inode, dirent and name landed so tests can
corrupt precise fields.
"""

from __future__ import annotations

import hashlib
import stat
import struct
from dataclasses import dataclass, field

from nydus_py.rafs import codec
from nydus_py.rafs.constants import BlobFeatures, ChunkFlags, Compressor, Digester, SuperFlags
from nydus_py.rafs.layout_blob import BLOB_META_MAGIC, pack_ci_v1, tar_header

BLOCK = 4096


@dataclass(eq=False)
class Node:
    """A file system object to encode. Hard links: the same Node under several names."""

    mode: int
    data: bytes = b""  # regular files
    target: bytes = b""  # symlinks
    children: dict[bytes, Node] | None = None  # directories
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    rdev: int = 0  # os.makedev value for chr/blk
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0


def d(children: dict[bytes, Node] | None = None, mode: int = 0o755, **kw: object) -> Node:
    return Node(stat.S_IFDIR | mode, children=dict(children or {}), **kw)  # type: ignore[arg-type]


def f(data: bytes = b"", mode: int = 0o644, **kw: object) -> Node:
    return Node(stat.S_IFREG | mode, data=data, **kw)  # type: ignore[arg-type]


def link(target: bytes, **kw: object) -> Node:
    return Node(stat.S_IFLNK | 0o777, target=target, **kw)  # type: ignore[arg-type]


def special(kind: int, rdev: int = 0, **kw: object) -> Node:
    return Node(kind | 0o644, rdev=rdev, **kw)  # type: ignore[arg-type]


@dataclass
class Built:
    bootstrap: bytes
    blob: bytes
    blob_id: str
    nids: dict[bytes, int]  # path -> nid
    inode_off: dict[bytes, int]  # path -> byte offset of the inode
    dirent_off: dict[tuple[bytes, bytes], int]  # (dir path, name) -> offset of its 12-byte dirent
    name_off: dict[tuple[bytes, bytes], int]  # (dir path, name) -> offset of the name bytes
    chunk_table_off: int
    chunk_count: int
    meta_start: int
    prefetch_off: int = 0


def new_encode_dev(rdev: int) -> int:
    import os

    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


_FT = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4, stat.S_IFIFO: 5, stat.S_IFSOCK: 6, stat.S_IFLNK: 7}
_PREFIXES = [
    (b"system.posix_acl_access", 2, True),
    (b"system.posix_acl_default", 3, True),
    (b"user.", 1, False),
    (b"trusted.", 4, False),
    (b"security.", 6, False),
]


def xattr_ibody(xattrs: dict[bytes, bytes]) -> bytes:
    if not xattrs:
        return b""
    body = bytearray(12)
    for name, value in xattrs.items():
        found = [(idx, b"" if exact else name[len(prefix) :]) for prefix, idx, exact in _PREFIXES
                 if (exact and name == prefix) or (not exact and name.startswith(prefix))]  # fmt: skip
        if not found:
            raise ValueError(f"xattr {name!r} has no EROFS prefix")
        index, suffix = found[0]
        ent = struct.pack("<BBH", len(suffix), index, len(value)) + suffix + value
        body += ent + b"\0" * (_align(len(ent), 4) - len(ent))
    return bytes(body)


def dir_blocks(entries: list[tuple[bytes, int, int]]) -> list[tuple[bytes, list[tuple[int, int]]]]:
    """Pack sorted (name, nid, ftype) into dirent blocks; returns (block bytes, [(dirent off, name off)])."""
    groups: list[list[tuple[bytes, int, int]]] = [[]]
    used = 0
    for e in entries:
        need = 12 + len(e[0])
        if used + need > BLOCK:
            groups.append([])
            used = 0
        groups[-1].append(e)
        used += need
    out = []
    for g in groups:
        n = len(g)
        nameoff = 12 * n
        heads, names, offs = bytearray(), bytearray(), []
        for name, nid, ft in g:
            offs.append((len(heads), nameoff))
            heads += struct.pack("<QHBB", nid, nameoff, ft, 0)
            names += name
            nameoff += len(name)
        out.append((bytes(heads + names), offs))
    return out


@dataclass
class _Ino:
    node: Node
    path: bytes
    nlink: int = 0
    nid: int = 0
    off: int = 0
    isize: int = 64
    xattrs: bytes = b""
    layout: int = 0
    size: int = 0
    i_u: int = 0
    chunk_refs: list[tuple[int, int, int]] = field(default_factory=list)  # (advise, device_id, blkaddr)


def encode(
    root: Node,
    *,
    compressor: Compressor = Compressor.ZSTD,
    digester: Digester = Digester.BLAKE3,
    chunk_size: int = 0x10_0000,
    compact: bool = False,
    explicit_uid_gid: bool = True,
    crc: bool = True,
    blob_id: str | None = None,
    prefetch: list[bytes] = (),  # type: ignore[assignment]
    build_time: int = 0,
    ci_compressor: Compressor = Compressor.NONE,
    toc: bool = True,
    blob_digest: bool = True,
    inline_bootstrap: bool = False,
) -> Built:
    # ---- collect inodes in DFS order, hard links once
    inos: dict[int, _Ino] = {}
    order: list[_Ino] = []
    paths: list[tuple[bytes, Node, bytes]] = []  # (path, node, parent path)
    stack: list[tuple[bytes, Node, bytes]] = [(b"/", root, b"/")]
    while stack:
        p, node, parent = stack.pop()
        paths.append((p, node, parent))
        if id(node) not in inos:
            inos[id(node)] = _Ino(node, p)
            order.append(inos[id(node)])
        inos[id(node)].nlink += 1
        if node.children is not None:
            base = p if p.endswith(b"/") else p + b"/"
            for name in sorted(node.children, reverse=True):
                stack.append((base + name, node.children[name], p))
    for ino in order:
        if ino.node.children is not None:
            ino.nlink = 2 + sum(1 for c in ino.node.children.values() if c.children is not None)

    # ---- blob: chunks deduplicated by digest, 4K-aligned uncompressed offsets
    chunk_data = bytearray()
    chunks: dict[bytes, tuple[int, int, int, int, int, int, int]] = {}  # digest -> (ci, c_off, c_size, u_off, u_size, flags, crc)
    u_next = 0
    for ino in order:
        if not stat.S_ISREG(ino.node.mode):
            continue
        data = ino.node.data
        for k in range(0, len(data), chunk_size):
            piece = data[k : k + chunk_size]
            dig = codec.digest(digester, piece)
            if dig not in chunks:
                packed = codec.compress(compressor, piece)
                flags = 0
                if len(packed) < len(piece):
                    flags |= ChunkFlags.COMPRESSED
                else:
                    packed = piece
                crc32 = codec.crc32c(piece) if crc else 0
                if crc:
                    flags |= ChunkFlags.HAS_CRC32
                chunks[dig] = (len(chunks), len(chunk_data), len(packed), u_next, len(piece), flags, crc32)
                chunk_data += packed
                u_next = _align(u_next + len(piece), BLOCK)
            ci, _c, _cs, u_off, _us, _f, _crc = chunks[dig]
            ino.chunk_refs.append((ci & 0xFFFF, 1 | ((ci >> 16) << 8), u_off // BLOCK))
    by_ci = sorted(chunks.items(), key=lambda kv: kv[1][0])
    ci_raw = b"".join(pack_ci_v1(v[1], v[2], v[3], v[4]) for _d, v in by_ci)
    ci_stored = ci_raw if ci_compressor == Compressor.NONE else codec.compress(ci_compressor, ci_raw)
    features = BlobFeatures.ALIGNED | BlobFeatures.CAP_TAR_TOC | BlobFeatures.HAS_TAR_HEADER
    if toc:
        features |= BlobFeatures.HAS_TOC
    if blob_digest:
        features |= BlobFeatures.INLINED_CHUNK_DIGEST
    if inline_bootstrap:
        features |= BlobFeatures.INLINED_FS_META
    blob = bytearray(chunk_data)
    sections: list[tuple[str, int, int, int, bytes]] = []  # name, flags, offset, size, sha256
    blob += tar_header("image.blob", len(chunk_data))
    ci_off = len(blob)
    header = bytearray(4096)
    struct.pack_into("<IIIIQQQ", header, 0, BLOB_META_MAGIC, int(features), int(ci_compressor), len(chunks), ci_off,
                     len(ci_stored), len(ci_raw))  # fmt: skip
    struct.pack_into("<I", header, 4092, BLOB_META_MAGIC)
    blob += ci_stored
    sections.append(("blob.meta", 1, ci_off, len(ci_stored), hashlib.sha256(ci_stored).digest()))
    sections.append(("blob.meta.header", 1, len(blob), 4096, hashlib.sha256(header).digest()))
    blob += header
    blob += tar_header("blob.meta", len(ci_stored) + 4096)
    if blob_digest:
        digests = b"".join(dig for dig, _v in by_ci)
        sections.append(("blob.digest", 1, len(blob), len(digests), hashlib.sha256(digests).digest()))
        blob += digests + tar_header("blob.digest", len(digests))
    prefix_size = len(blob)
    u_size = max(u_next, BLOCK)
    toc_size = 128 * (len(sections) + (1 if inline_bootstrap else 0)) + 512 if toc else 0

    def finish_blob(boot: bytes | None) -> tuple[bytes, bytes]:
        out = bytearray(blob)
        secs = list(sections)
        if boot is not None:
            packed = codec.compress(Compressor.ZSTD, boot) if toc else boot
            secs.append(("image.boot", 2 if toc else 1, len(out), len(packed), hashlib.sha256(boot).digest()))
            out += packed + tar_header("image.boot", len(packed))
        toc_digest = b"\0" * 32
        if toc:
            ents = bytearray()
            for name, flags, off, size, dig in secs:
                usize = len(boot) if name == "image.boot" and boot is not None else size
                ents += struct.pack("<II16s32sQQQ48s", flags, 0, name.encode(), dig, off, size, usize, b"")
            tail = bytes(ents) + tar_header("rafs.blob.toc", len(ents))
            toc_digest = hashlib.sha256(tail).digest()
            out += tail
        return bytes(out), toc_digest

    if inline_bootstrap:
        bid = blob_id or "x" * 64
        toc_digest = b"\0" * 32
        blob_c_size = prefix_size
        t_size = 0
    else:
        blob_out, toc_digest = finish_blob(None)
        bid = blob_id or hashlib.sha256(blob_out).hexdigest()
        blob_c_size = len(blob_out)
        t_size = toc_size
    has_blob = True
    nblobs = 1 if has_blob else 0

    # ---- bootstrap layout
    blob_table_off = _align(1408 + 128 * nblobs, BLOCK)
    pf_off = blob_table_off + 256 * nblobs
    pf_size = 4 * len(prefetch)
    meta_start = _align(pf_off + pf_size, BLOCK)
    cursor = meta_start + BLOCK  # nydus leaves the first meta block empty
    for ino in order:
        n = ino.node
        fits_compact = compact and n.uid < 1 << 16 and n.gid < 1 << 16 and ino.nlink < 1 << 16 and len(n.data) < 1 << 32
        fits_compact = fits_compact and 0 <= n.mtime - build_time < 1 << 32
        ino.isize = 32 if fits_compact else 64
        ino.xattrs = xattr_ibody(n.xattrs)
        ifmt = stat.S_IFMT(n.mode)
        if ifmt == stat.S_IFDIR:
            assert n.children is not None
            names = [b".", b".."] + list(n.children)
            ino.size = 0
            for name in sorted(names):
                need = 12 + len(name)
                if ino.size % BLOCK + need > BLOCK:
                    ino.size = _align(ino.size, BLOCK)
                ino.size += need
        elif ifmt == stat.S_IFLNK:
            ino.size = len(n.target)
        elif ifmt == stat.S_IFREG:
            ino.size = len(n.data)
        core = ino.isize + len(ino.xattrs)
        if ifmt == stat.S_IFREG:
            ino.layout = 4
            total = _align(core, 8) + 8 * len(ino.chunk_refs)
        elif ifmt in (stat.S_IFDIR, stat.S_IFLNK):
            tail = ino.size % BLOCK
            ino.layout = 2 if tail and core + tail <= BLOCK else 0
            total = core + (tail if ino.layout == 2 else 0)
        else:
            ino.layout = 0
            total = core
        cursor = _align(cursor, 32)
        if ino.layout != 4 and cursor % BLOCK + total > BLOCK:
            cursor = _align(cursor, BLOCK)
        ino.off = cursor
        ino.nid = (cursor - meta_start) // 32
        cursor += total
    data_block = _align(cursor, BLOCK) // BLOCK
    # full data blocks for directories / symlinks
    for ino in order:
        if ino.layout in (0, 2) and ino.size and stat.S_IFMT(ino.node.mode) in (stat.S_IFDIR, stat.S_IFLNK):
            nblocks = -(-ino.size // BLOCK)
            nfull = nblocks if ino.layout == 0 else nblocks - 1
            ino.i_u = data_block
            data_block += nfull
    chunk_table_off = data_block * BLOCK
    records = []
    for dig, (ci, c_off, c_size, u_off, usz, flags, crc32) in chunks.items():
        records.append(struct.pack("<32sIIIIQQQII", dig, 0, flags, c_size, usz, c_off, u_off, 0, ci, crc32))
    records.sort()  # by digest (blob index is always 0 here)
    chunk_table = b"".join(records)
    total_size = _align(chunk_table_off + len(chunk_table), BLOCK)
    boot = bytearray(total_size)

    nid_of = {id(i.node): i.nid for i in order}
    nids = {p: nid_of[id(node)] for p, node, _par in paths}
    inode_off = {p: inos[id(node)].off for p, node, _par in paths}
    dirent_off: dict[tuple[bytes, bytes], int] = {}
    name_off: dict[tuple[bytes, bytes], int] = {}

    # ---- superblock, ext superblock, device slot, blob table, prefetch table
    flags = SuperFlags.for_algorithms(compressor, digester)
    if explicit_uid_gid:
        flags |= SuperFlags.EXPLICIT_UID_GID
    if any(n.node.xattrs for n in order):
        flags |= SuperFlags.HAS_XATTR
    if blob_digest:
        flags |= SuperFlags.INLINED_CHUNK_DIGEST
    root_nid = nid_of[id(root)]
    struct.pack_into("<IIIBBHQQIIII16s16sIHHH", boot, 1024, 0xE0F5E1E2, 0, 0x4000_0000, 12, 0, root_nid, len(paths),
                     build_time, 0, u_size // BLOCK * nblobs, meta_start // BLOCK, 0, b"", b"", 0xC, 0, nblobs, 11)  # fmt: skip
    struct.pack_into("<QQIIQQQI", boot, 1152, int(flags), blob_table_off, 256 * nblobs, chunk_size, chunk_table_off,
                     len(chunk_table), pf_off if pf_size else 0, pf_size)  # fmt: skip
    if has_blob:
        struct.pack_into("<64sII", boot, 1408, bid.encode(), u_size // BLOCK, 0)
        struct.pack_into("<64sIIIIIIQQIIQQQ32s", boot, blob_table_off, bid.encode(), 0, chunk_size, len(chunks),
                         int(compressor), int(digester), int(features), blob_c_size, u_size, t_size,
                         int(ci_compressor), ci_off, len(ci_stored), len(ci_raw), toc_digest)  # fmt: skip
    for k, p in enumerate(prefetch):
        struct.pack_into("<I", boot, pf_off + 4 * k, nids[p])

    # ---- inodes and their data
    parent_nid = {}
    for _p, node, par in paths:
        parent_nid[id(node)] = nids[par]
    for ino in order:
        n = ino.node
        ifmt = stat.S_IFMT(n.mode)
        fmt = (ino.layout << 1) | (1 if ino.isize == 64 else 0)
        icount = (len(ino.xattrs) - 12) // 4 + 1 if ino.xattrs else 0
        if ifmt == stat.S_IFREG:
            i_u = 0x20 | (chunk_size.bit_length() - 1 - 12)
        elif ifmt in (stat.S_IFCHR, stat.S_IFBLK):
            i_u = new_encode_dev(n.rdev)
        else:
            i_u = ino.i_u
        if ino.isize == 64:
            struct.pack_into("<HHHHQIIIIQII", boot, ino.off, fmt, icount, n.mode, 0, ino.size, i_u, ino.nid, n.uid, n.gid,
                             n.mtime, n.mtime_nsec, ino.nlink)  # fmt: skip
        else:
            struct.pack_into("<HHHHIIIIHH", boot, ino.off, fmt, icount, n.mode, ino.nlink, ino.size, n.mtime - build_time,
                             i_u, ino.nid, n.uid, n.gid)  # fmt: skip
        xoff = ino.off + ino.isize
        boot[xoff : xoff + len(ino.xattrs)] = ino.xattrs
        data_off = xoff + len(ino.xattrs)
        if ifmt == stat.S_IFREG:
            pos = _align(data_off, 8)
            for advise, dev, blk in ino.chunk_refs:
                struct.pack_into("<HHI", boot, pos, advise, dev, blk)
                pos += 8
            continue
        if ifmt == stat.S_IFDIR:
            assert n.children is not None
            ents = [(b".", ino.nid, 2), (b"..", parent_nid[id(n)], 2)]
            ents += [(name, nid_of[id(c)], _FT[stat.S_IFMT(c.mode)]) for name, c in n.children.items()]
            ents.sort()
            blocks = dir_blocks(ents)
            dpath = ino.path
            k = 0
            for b, (raw, offs) in enumerate(blocks):
                last = b == len(blocks) - 1
                at = data_off if (last and ino.layout == 2) else (ino.i_u + b) * BLOCK
                boot[at : at + len(raw)] = raw
                for de, no in offs:
                    name = ents[k][0]
                    dirent_off[(dpath, name)] = at + de
                    name_off[(dpath, name)] = at + no
                    k += 1
        elif ifmt == stat.S_IFLNK:
            at = data_off if ino.layout == 2 else ino.i_u * BLOCK
            boot[at : at + len(n.target)] = n.target
    boot[chunk_table_off : chunk_table_off + len(chunk_table)] = chunk_table
    boot_bytes = bytes(boot)
    if inline_bootstrap:
        blob_out, _dig = finish_blob(boot_bytes)
    return Built(boot_bytes, blob_out, bid, nids, inode_off, dirent_off, name_off, chunk_table_off, len(records), meta_start,
                 pf_off)  # fmt: skip


def sample_tree(big: int = 3 * 0x10_0000 + 1234) -> Node:
    """A tree exercising every reader path: chunked/dedup'd/empty files, multi-block dirs, inline
    and plain symlinks, xattrs, hard links, devices, fifo, socket."""
    import os
    import random

    rnd = random.Random(7)
    shared = f(b"hello, world\n", uid=1000, gid=1000, mtime=1_700_000_000, mtime_nsec=5)
    many = {b"f%04d" % i: f(b"x%d" % i) for i in range(300)}
    return d(
        {
            b"big.bin": f(rnd.randbytes(big), mtime=1_600_000_000),
            b"zeros": f(b"\0" * (2 * 0x10_0000)),
            b"empty": f(b""),
            b"hello.txt": shared,
            b"hardlink": shared,
            b"-early": f(b"sorts before dot"),
            b"dir": d({b"sub": d({b"leaf": f(b"leaf")}), b"many": d(many)}),
            b"short-link": link(b"hello.txt"),
            b"long-link": link(b"a/" * 2043 + b"end!"),  # 4090 bytes: FLAT_PLAIN
            b"plain-dir": d({b"p%026d" % i: f(b"") for i in range(103)}),  # 4044-byte block: FLAT_PLAIN
            b"xattrs": f(b"x", xattrs={b"user.k": b"v", b"trusted.t": b"tv" * 10, b"security.selinux": b"ctx\0"}),
            b"dev-chr": special(stat.S_IFCHR, os.makedev(1, 3)),
            b"dev-blk": special(stat.S_IFBLK, os.makedev(259, 70000)),
            b"fifo": special(stat.S_IFIFO),
            b"sock": special(stat.S_IFSOCK),
        },
        mtime=1_650_000_000,
        xattrs={b"user.dir": b"yes"},
    )
