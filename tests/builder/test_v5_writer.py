"""RAFS v5 builder: hypothesis trees built to v5 and checked two ways, an independent struct parse of
every byte of the layout (slot order, record tails, digests, blob tables, plain blob) and the
project's v5 reader (every attribute and all data); the Nydus fixtures rebuilt from their unpacked
trees; merge of v5 layers; refusals; and a real FUSE mount of a v5 image."""

import hashlib
import io
import os
import random
import stat
import struct
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydus_py.builder.build import build_image
from nydus_py.builder.check import check_image
from nydus_py.builder.merge import tree_from_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.packed import Tree
from nydus_py.builder.tree import ChunkedData, FileData, Inode, walk
from nydus_py.cli.image import main
from nydus_py.rafs import codec, open_bootstrap
from nydus_py.rafs.chunkdata import read_file_range
from nydus_py.rafs.constants import BlobFeatures, ChunkFlags, Compressor, Digester, SuperFlags
from nydus_py.rafs.errors import FormatError
from nydus_py.rafs.model import RafsImage
from nydus_py.rafs.v5 import V5Image
from nydus_py.storage.localfs import LocalBlobDir
from tests.conftest import require_device
from tests.rafs import v5craft

SB, REC, CHUNK_REC = 8192, 128, 80
_SUPER = struct.Struct("<IIIIQQQQQIIIIQ")
_INODE = struct.Struct("<32sQQIIIIQQQIIIHHIIQQ")
_CHUNK = struct.Struct("<32sIIIIQQQII")
SMALL = 0x1000


def reg(data: bytes, **kw) -> Inode:
    return Inode(
        mode=stat.S_IFREG | kw.pop("perm", 0o644), data=FileData(len(data), lambda: io.BytesIO(data)), **kw
    )


def content(node: Inode) -> bytes:
    if node.data is None:
        return b""
    assert isinstance(node.data, FileData)
    with node.data.open() as f:
        return f.read()


def a8(n: int) -> int:
    return (n + 7) & ~7


# -- hypothesis trees --------------------------------------------------------------------------

attrs = st.fixed_dictionaries(
    {
        "uid": st.integers(0, 2**32 - 1),
        "gid": st.integers(0, 2**32 - 1),
        "mtime": st.integers(0, 2**40),
        "mtime_nsec": st.integers(0, 999_999_999),
        "xattrs": st.dictionaries(
            st.sampled_from([b"user.a", b"user.zz", b"trusted.b", b"security.c", b"system.posix_acl_access"]),
            st.binary(max_size=40),
            max_size=3,
        ),
    }
)


def payload(kind: int, size: int, salt: int) -> bytes:
    if kind == 0:  # zeros: chunks dedup within and across files
        return b"\0" * size
    if kind == 1:  # repeats a chunk-sized pattern: dedup inside the file
        return (bytes([salt % 7]) * SMALL * (size // SMALL + 1))[:size]
    return random.Random(salt).randbytes(size)


leaf = st.one_of(
    st.builds(
        lambda k, n, s, p, a: reg(payload(k, n, s), perm=p, **a),
        st.integers(0, 2),
        st.one_of(st.integers(0, 3 * SMALL + 17), st.sampled_from([SMALL, 2 * SMALL])),
        st.integers(0, 3),
        st.integers(0, 0o7777),
        attrs,
    ),
    st.builds(
        lambda t, a: Inode(mode=stat.S_IFLNK | 0o777, symlink=t, **a),
        st.binary(min_size=1, max_size=120).map(lambda t: t.replace(b"\0", b"0")),
        attrs,
    ),
    st.builds(
        lambda m, rd, a: Inode(mode=m | 0o640, rdev=rd, **a),
        st.sampled_from([stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK]),
        st.builds(os.makedev, st.integers(0, 4095), st.integers(0, 2**20 - 1)),
        attrs,
    ),
)
names = (
    st.binary(min_size=1, max_size=24)
    .map(lambda n: n.replace(b"/", b"_").replace(b"\0", b"_"))
    .filter(lambda n: n not in (b".", b".."))
)


def kids(node: "Inode | Tree") -> dict[bytes, Any]:
    n: Any = node.root if isinstance(node, Tree) else node
    assert n.children is not None
    return n.children


def lk(img: RafsImage, parent: int, name: bytes) -> int:
    ino = img.lookup(parent, name)
    assert ino is not None, name
    return ino


def open_v5(path: str | Path) -> V5Image:
    img = open_bootstrap(str(path))
    assert isinstance(img, V5Image), path
    return img


def mkdir(children: dict[bytes, Inode], a: dict) -> Inode:
    d = Inode.directory(0o755, **a)
    kids(d).update(children)
    return d


trees = st.recursive(
    leaf, lambda ch: st.builds(mkdir, st.dictionaries(names, ch, max_size=7), attrs), max_leaves=30
)


def add_links(root: Inode, data: st.DataObject) -> None:
    """Hard links of regular files, and a symlink / fifo named twice (separate inodes in v5)."""
    dirs = [n for _p, n in walk(root) if n.is_dir]
    files = [n for _p, n in walk(root) if n.is_reg]
    others = [n for _p, n in walk(root) if not n.is_dir and not n.is_reg]
    links: int = data.draw(st.integers(0, 3)) if files else 0
    for i in range(links):
        kids(data.draw(st.sampled_from(dirs)))[b"hardlink-%d" % i] = data.draw(st.sampled_from(files))
    twice: bool = bool(others) and data.draw(st.booleans())
    if twice:
        kids(data.draw(st.sampled_from(dirs)))[b"same-object"] = data.draw(st.sampled_from(others))


# -- an independent model of what nydus-image writes -------------------------------------------


@dataclass
class Want:
    """What one inode-table slot must hold."""

    path: bytes
    name: bytes
    node: Inode
    parent: int
    slot: int
    child_index: int = 0
    ino: int = 0
    nlink: int = 0


def expected_slots(root: Inode) -> list[Want]:
    """Slot order per spec 3.7, by recursion (independent of the writer's explicit stack)."""
    out = [Want(b"/", b"/", root, 0, 1)]

    def visit(d: Want) -> None:
        names = sorted(kids(d.node))
        d.child_index = len(out) + 1
        first = len(out)
        for name in names:
            out.append(
                Want(d.path.rstrip(b"/") + b"/" + name, name, kids(d.node)[name], d.slot, len(out) + 1)
            )
        for i, name in enumerate(names):
            if kids(d.node)[name].is_dir:
                visit(out[first + i])

    visit(out[0])
    first_slot: dict[int, int] = {}
    links: dict[int, int] = {}
    for e in out:
        e.ino = first_slot.setdefault(id(e.node), e.slot) if e.node.is_reg else e.slot
        links[id(e.node)] = links.get(id(e.node), 0) + 1
    for e in out:
        if e.node.is_dir:
            e.nlink = 2 + sum(1 for c in kids(e.node).values() if c.is_dir)
        else:
            e.nlink = links[id(e.node)] if e.node.is_reg else 1
    return out


def chunk_ids(node: Inode, cs: int, digester: Digester) -> list[bytes]:
    data = content(node)
    return [codec.digest(digester, data[o : o + cs]) for o in range(0, len(data), cs)]


def expected_digests(slots: list[Want], cs: int, digester: Digester) -> list[bytes]:
    out = [b""] * len(slots)
    for e in reversed(slots):
        node = e.node
        if node.is_reg:
            h = codec.digest(digester, b"".join(chunk_ids(node, cs, digester)))
        elif node.is_symlink:
            h = codec.digest(digester, node.symlink or b"")
        elif node.is_dir:
            ci = e.child_index
            h = codec.digest(digester, b"".join(out[ci - 1 : ci - 1 + len(kids(node))]))
        else:
            h = codec.digest(digester, b"")
        out[e.slot - 1] = h
    return out


def xattr_table(x: dict[bytes, bytes]) -> bytes:
    body = b"".join(struct.pack("<I", len(k) + 1 + len(v)) + k + b"\0" + v for k, v in sorted(x.items()))
    t = struct.pack("<Q", len(body)) + body
    return t + b"\0" * (-len(t) % 8)


def verify_layout(root: Inode, boot: bytes, blob_dir: str, opts: BuildOptions) -> None:
    """Parse `boot` with struct only and compare every byte-level field to the model."""
    cs, dg = opts.chunk_size, opts.digester
    slots = expected_slots(root)
    digests = expected_digests(slots, cs, dg)
    assert len(boot) % 8 == 0
    (magic, ver, sbsize, bs, flags, icount, itab, ptab, btab, ient, pent, bsize, xent, xoff) = (
        _SUPER.unpack_from(boot, 0)
    )
    assert (magic, ver, sbsize, bs) == (0x52414653, 0x500, SB, cs)
    assert boot[80:SB] == bytes(SB - 80)
    want_flags = SuperFlags.for_algorithms(opts.compressor, dg)
    if not opts.repeatable:
        want_flags |= SuperFlags.EXPLICIT_UID_GID
    if any(e.node.xattrs for e in slots):
        want_flags |= SuperFlags.HAS_XATTR
    assert flags == want_flags
    assert ient == len(slots) and icount == len({e.ino for e in slots})
    assert itab == SB and ptab == itab + a8(4 * ient) and pent == 0 and btab == ptab
    blobs = sorted(os.listdir(blob_dir)) if os.path.isdir(blob_dir) else []
    any_data = any(e.node.is_reg and e.node.size for e in slots)
    assert len(blobs) == (1 if any_data else 0)
    if blobs:
        bid = blobs[0]
        raw = (Path(blob_dir) / bid).read_bytes()
        assert bid == hashlib.sha256(raw).hexdigest()
        entry = struct.pack("<II", 0, 0) + bid.encode()
        assert bsize == a8(len(entry)) and boot[btab : btab + bsize] == entry + bytes(bsize - len(entry))
        assert (xent, xoff) == (1, btab + bsize)
        chunk_count, features, usize, csize = struct.unpack_from("<IIQQ", boot, xoff)
        assert features == BlobFeatures.CAP_TAR_TOC and csize == len(raw)
        assert boot[xoff + 24 : xoff + 64] == bytes(40)
        rec_start = xoff + 64
    else:
        assert bsize == 0 and xent == 0
        rec_start = btab
    stored: dict[tuple[int, int], tuple[int, int, int, bytes, int]] = {}  # (coff, csize) -> ...
    pos = rec_start
    for e, want_digest in zip(slots, digests, strict=True):
        node, slot = e.node, e.slot
        off = struct.unpack_from("<I", boot, itab + 4 * (slot - 1))[0] << 3
        assert off == pos, ("records follow slot order back to back", slot)
        f = _INODE.unpack_from(boot, off)
        (digest, parent, ino, uid, gid, projid, mode, size, blocks, iflags, nlink, cidx, ccount, nsz, ssz, rdev,
         nsec, mtime, reserved) = f  # fmt: skip
        where = e.path
        assert digest == want_digest, where
        assert (parent, ino, projid, mode, nlink, reserved) == (
            e.parent,
            e.ino,
            0,
            node.mode,
            e.nlink,
            0,
        )
        assert (uid, gid) == ((0, 0) if opts.repeatable else (node.uid, node.gid)), where
        assert (mtime, nsec) == (node.mtime, node.mtime_nsec), where
        assert rdev == (node.rdev if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode) else 0), where
        name = e.name
        assert nsz == len(name) and boot[off + REC : off + REC + nsz] == name
        tail = off + REC + a8(nsz)
        want_iflags = 0
        if node.is_symlink:
            want_iflags |= 1
            assert ssz == len(node.symlink or b"") and boot[tail : tail + ssz] == node.symlink
            tail += a8(ssz)
        else:
            assert ssz == 0
        xt = xattr_table(node.xattrs) if node.xattrs else b""
        if xt:
            want_iflags |= 4
            assert boot[tail : tail + len(xt)] == xt, where
            tail += len(xt)
        assert iflags == want_iflags, where  # never HAS_HOLE, never HARDLINK
        if node.is_dir:
            ns = sum(len(n) + 8 for n in kids(node))
            assert size == ((ns + 4095) // 4096 * 4096 if ns else 4096), where
            assert (cidx, ccount) == (e.child_index, len(kids(node))), where
        elif node.is_reg:
            ids = chunk_ids(node, cs, dg)
            assert size == node.size and (cidx, ccount) == (0, len(ids)), where
            data = content(node)
            for k, cid in enumerate(ids):
                c = _CHUNK.unpack_from(boot, tail + k * CHUNK_REC)
                assert c[0] == cid and c[1] == 0 and c[7] == k * cs, (where, k)
                assert c[4] == len(data[k * cs : (k + 1) * cs])
                assert (
                    c[2] & ~(ChunkFlags.COMPRESSED | ChunkFlags.HAS_CRC32) == 0
                    and c[2] & ChunkFlags.HAS_CRC32
                )
                assert c[9] == codec.crc32c(data[k * cs : (k + 1) * cs])
                prev = stored.setdefault((c[5], c[3]), (c[6], c[4], c[8], c[0], c[2]))
                assert prev == (c[6], c[4], c[8], c[0], c[2]), "one stored copy per distinct chunk"
            tail += CHUNK_REC * len(ids)
        else:
            assert size == (len(node.symlink or b"") if node.is_symlink else 0) and (cidx, ccount) == (0, 0)
        xattr_bytes = a8(struct.unpack_from("<Q", xt)[0]) if xt else 0
        assert blocks == (size + xattr_bytes + 511) // 512, where
        pos = tail
    assert pos == len(boot)
    if blobs:
        # plain v5 blob: distinct chunks back to back, unaligned, indexes in blob order
        order = sorted(stored.items())
        assert len(order) == chunk_count == len({v[3] for v in stored.values()})
        coff = uoff = 0
        for i, ((c_off, c_size), (u_off, u_size, index, _cid, _fl)) in enumerate(order):
            assert (c_off, u_off, index) == (coff, uoff, i)
            coff, uoff = coff + c_size, uoff + u_size
        assert coff == len(raw) and uoff == usize


def verify_reader(root: Inode, boot_path: str, blob_dir: str, opts: BuildOptions) -> None:
    """The project's reader sees every attribute and byte of the source tree."""
    slots = expected_slots(root)
    by_path = {e.path: e for e in slots}
    img = open_bootstrap(boot_path)
    src = LocalBlobDir(blob_dir)
    try:
        assert isinstance(img, V5Image) and img.version == 5
        assert img.slot_count == len(slots) and img.chunk_size == opts.chunk_size
        assert all(img.inode_digest_ok(s) for s in range(1, len(slots) + 1))
        assert img.prefetch_table() == []
        seen = 0
        for path, ino in img.walk():
            e = by_path[path]
            node = e.node
            seen += 1
            assert ino == e.ino, path
            a = img.getattr(ino)
            assert (a.mode, a.nlink, a.mtime, a.mtime_nsec) == (
                node.mode,
                e.nlink,
                node.mtime,
                node.mtime_nsec,
            )
            want_ids = (os.geteuid(), os.getegid()) if opts.repeatable else (node.uid, node.gid)
            assert (a.uid, a.gid) == want_ids, path
            assert {k: img.getxattr(ino, k) for k in img.listxattr(ino)} == node.xattrs, path
            if node.is_symlink:
                assert img.readlink(ino) == node.symlink
            elif node.is_reg:
                data = content(node)
                assert a.size == len(data)
                assert read_file_range(src, img, ino, 0, a.size + 10, validate=True) == data, path
                if len(data) > SMALL:
                    assert read_file_range(src, img, ino, SMALL - 3, 7) == data[SMALL - 3 : SMALL + 4]
            elif stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
                assert a.rdev == node.rdev
        assert seen == len(slots)
        assert check_image(img, blob_dir).ok
    finally:
        img.close()
        src.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(
    tree=st.builds(mkdir, st.dictionaries(names, trees, min_size=1, max_size=8), attrs),
    data=st.data(),
    compressor=st.sampled_from([Compressor.ZSTD, Compressor.LZ4_BLOCK, Compressor.NONE]),
    digester=st.sampled_from([Digester.BLAKE3, Digester.SHA256]),
    repeatable=st.booleans(),
)
def test_v5_build_matches_model_and_reader(tmp_path_factory, tree, data, compressor, digester, repeatable):
    add_links(tree, data)
    work = tmp_path_factory.mktemp("v5")
    opts = BuildOptions(
        fs_version=5, chunk_size=SMALL, compressor=compressor, digester=digester, repeatable=repeatable
    )
    boot, blobs = str(work / "boot"), str(work / "blobs")
    r = build_image(tree, boot, blobs, opts)
    assert r.inodes == len({e.ino for e in expected_slots(tree)})
    verify_layout(tree, Path(boot).read_bytes(), blobs, opts)
    verify_reader(tree, boot, blobs, opts)


# -- fixed trees: CLI, prefetch, errors --------------------------------------------------------


def sample_tree() -> Inode:
    root = Inode.directory(mtime=5)
    big = reg(random.Random(3).randbytes(5 * SMALL + 99), xattrs={b"user.k": b"v"})
    kids(root)[b"big"] = big
    kids(root)[b"zeros"] = reg(b"\0" * (3 * SMALL))
    sub = Inode.directory(0o700, uid=7, gid=8)
    kids(root)[b"sub"] = sub
    kids(sub)[b"link-to-big"] = big
    kids(sub)[b"empty-dir"] = Inode.directory()
    kids(sub)[b"sym"] = Inode(mode=stat.S_IFLNK | 0o777, symlink=b"../big")
    kids(root)[b"dev"] = Inode(mode=stat.S_IFCHR | 0o600, rdev=os.makedev(1, 3))
    kids(root)[b"a-empty"] = reg(b"")
    return root


def test_cli_create_check_inspect_unpack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"hello\n" * 2000)
    os.link(src / "d" / "f", src / "hl")
    (src / "z").write_bytes(bytes(3 * SMALL))
    os.symlink("d/f", src / "s")
    boot, blobs = tmp_path / "boot", tmp_path / "blobs"
    argv = ["create", "--fs-version", "5", "--chunk-size", "0x1000", "-B", boot, "-D", blobs, src]
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    with open_bootstrap(str(boot)) as img:
        assert img.version == 5 and img.compressor == Compressor.ZSTD
        assert lk(img, lk(img, img.root_ino, b"d"), b"f") == lk(img, img.root_ino, b"hl")
        bid = img.blobs[0].blob_id
    assert f"blob: {bid}" in out
    assert main(["check", "-B", str(boot), "-D", str(blobs)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["inspect", "-B", str(boot)]) == 0
    assert "RAFS v5" in capsys.readouterr().out
    assert main(["unpack", "-B", str(boot), "-D", str(blobs), "-o", str(tmp_path / "o.tar")]) == 0
    # a damaged chunk is found by check
    raw = bytearray((blobs / bid).read_bytes())
    raw[5] ^= 1
    (blobs / bid).write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["check", "-B", str(boot), "-D", str(blobs)]) == 1


def test_prefetch_table_holds_inode_numbers_and_orders_the_blob(tmp_path: Path) -> None:
    root = sample_tree()
    opts = BuildOptions(fs_version=5, chunk_size=SMALL, compressor=Compressor.NONE,
                        prefetch_paths=[b"/sub/link-to-big", b"/zeros", b"/missing", b"rel", b"/sub/link-to-big/x"])  # fmt: skip
    build_image(root, str(tmp_path / "boot"), str(tmp_path / "blobs"), opts)
    with open_bootstrap(str(tmp_path / "boot")) as img:
        sub = lk(img, img.root_ino, b"sub")
        link = lk(img, sub, b"link-to-big")
        zeros = lk(img, img.root_ino, b"zeros")
        big = lk(img, img.root_ino, b"big")
        assert link == big  # the hard link's i_ino is the first name's slot
        assert img.prefetch_table() == [big, zeros]
        # prefetched files' data comes first in the blob, in pattern order
        assert img.chunks(big)[0].compressed_offset == 0
        assert img.chunks(zeros)[0].compressed_offset == 5 * SMALL + 99


def test_v5_build_is_repeatable(tmp_path: Path) -> None:
    opts = BuildOptions(fs_version=5, chunk_size=SMALL, repeatable=True)
    r1 = build_image(sample_tree(), str(tmp_path / "b1"), str(tmp_path / "x1"), opts)
    r2 = build_image(sample_tree(), str(tmp_path / "b2"), str(tmp_path / "x2"), opts)
    assert (tmp_path / "b1").read_bytes() == (tmp_path / "b2").read_bytes()
    assert r1.blob_id == r2.blob_id and r1.inodes == r2.inodes == 8


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: kids(kids(r)[b"sub"]).__setitem__(b"loop", kids(r)[b"sub"]), "linked twice"),
        (lambda r: kids(r).__setitem__(b"x", reg(b"1", xattrs={b"os2.bad": b""})), "not storable"),
        (lambda r: kids(r).__setitem__(b"x", reg(b"1", xattrs={b"user.": b""})), "not storable"),
        (lambda r: kids(r).__setitem__(b"d", Inode(mode=stat.S_IFBLK, rdev=1 << 40)), "32-bit"),
        (lambda r: kids(r).__setitem__(b"s", Inode(mode=stat.S_IFLNK | 0o777, symlink=b"")), "symlink"),
        (lambda r: kids(r).__setitem__(b"a/b", reg(b"")), "invalid entry name"),
        (lambda r: kids(r).__setitem__("str-name", reg(b"")), "not bytes"),  # type: ignore[index]
        (lambda r: kids(r).__setitem__(b"u", reg(b"", uid=1 << 32)), "uid"),
        (lambda r: kids(r).__setitem__(b"m", Inode(mode=0o170000)), "file type"),
    ],
)
def test_bad_trees_fail_before_any_blob(tmp_path: Path, mutate, message: str) -> None:
    root = sample_tree()
    mutate(root)
    with pytest.raises(FormatError, match=message):
        build_image(root, str(tmp_path / "boot"), str(tmp_path / "blobs"), BuildOptions(fs_version=5))
    assert not (tmp_path / "boot").exists()
    assert not (tmp_path / "blobs").exists() or os.listdir(tmp_path / "blobs") == []


def test_empty_image_has_no_blob(tmp_path: Path) -> None:
    root = Inode.directory()
    kids(root)[b"e"] = reg(b"")
    r = build_image(root, str(tmp_path / "boot"), str(tmp_path / "blobs"), BuildOptions(fs_version=5))
    assert r.blob_id is None and r.blob_ids == []
    verify_layout(root, (tmp_path / "boot").read_bytes(), str(tmp_path / "blobs"), BuildOptions(fs_version=5))
    with open_bootstrap(str(tmp_path / "boot")) as img:
        assert img.blobs == [] and img.getattr(lk(img, 1, b"e")).size == 0


# -- existing chunks: merge, HAS_HOLE pass-through, refusals -----------------------------------


def test_merge_v5_layers_reuses_both_blobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blobs = tmp_path / "blobs"
    lower = Inode.directory()
    kids(lower)[b"keep"] = reg(random.Random(1).randbytes(2 * SMALL + 5))
    kids(lower)[b"gone"] = reg(b"gone")
    upper = Inode.directory()
    kids(upper)[b".wh.gone"] = reg(b"")
    kids(upper)[b"new"] = reg(random.Random(2).randbytes(SMALL + 1))
    opts = BuildOptions(fs_version=5, chunk_size=SMALL, compressor=Compressor.LZ4_BLOCK)
    r1 = build_image(lower, str(tmp_path / "l1"), str(blobs), opts)
    r2 = build_image(upper, str(tmp_path / "l2"), str(blobs), opts)
    before = sorted(os.listdir(blobs))
    assert (
        main(
            ["merge", "-B", str(tmp_path / "m"), "-D", str(blobs), str(tmp_path / "l1"), str(tmp_path / "l2")]
        )
        == 0
    )
    assert sorted(os.listdir(blobs)) == before  # no new data
    with closing(open_v5(tmp_path / "m")) as img:
        assert img.version == 5 and [b.blob_id for b in img.blobs] == [r1.blob_id, r2.blob_id]
        assert img.compressor == Compressor.LZ4_BLOCK
        assert sorted(e.name for e in img.readdir(1)) == [b"keep", b"new"]
        src = LocalBlobDir(str(blobs))
        for name, node in ((b"keep", kids(lower)[b"keep"]), (b"new", kids(upper)[b"new"])):
            ino = lk(img, 1, name)
            assert read_file_range(src, img, ino, 0, 1 << 20) == content(node)
        src.close()
        assert all(img.inode_digest_ok(s) for s in range(1, img.slot_count + 1))
        assert check_image(img, str(blobs)).ok
    # the merged bootstrap is what building the merged tree directly would give, minus new data
    capsys.readouterr()


def test_merge_with_nydus_fixture_layer(nydus_fixtures: Path, tmp_path: Path) -> None:
    """A real nydus v5 layer below a layer of ours: the fixture's chunks are referenced as is."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    fixture_blob = "7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"
    os.symlink(nydus_fixtures / "blobs" / fixture_blob, blobs / fixture_blob)
    upper = Inode.directory()
    kids(upper)[b"added"] = reg(b"on top\n")
    opts = BuildOptions(fs_version=5, compressor=Compressor.NONE, digester=Digester.SHA256)
    up = build_image(upper, str(tmp_path / "up"), str(blobs), opts)
    assert up.blob_id is not None
    boot = str(nydus_fixtures / "v5-sha256-none.boot")
    assert main(["merge", "-B", str(tmp_path / "m"), "-D", str(blobs), boot, str(tmp_path / "up")]) == 0
    with closing(open_v5(tmp_path / "m")) as merged, open_bootstrap(boot) as orig:
        # the blob table lists blobs in order of first use (build_image's rule): /added comes first
        assert sorted(b.blob_id for b in merged.blobs) == sorted([fixture_blob, up.blob_id])
        src = LocalBlobDir(str(blobs))
        for path, ino in orig.walk():
            if stat.S_ISREG(orig.getattr(ino).mode):
                m = merged_ino(merged, path)
                got = merged.chunks(m)
                assert all(merged.blobs[c.blob_index].blob_id == fixture_blob for c in got), path
                assert [c._replace(blob_index=0) for c in got] == orig.chunks(ino), path
                assert read_file_range(src, merged, m, 0, 1 << 22) == read_file_range(
                    src, orig, ino, 0, 1 << 22
                )
        src.close()
        assert check_image(merged, str(blobs)).ok


def merged_ino(img: RafsImage, path: bytes) -> int:
    ino = img.root_ino
    for comp in path.strip(b"/").split(b"/"):
        ino = lk(img, ino, comp)
    return ino


def test_existing_chunks_must_fit_the_image(nydus_fixtures: Path, tmp_path: Path) -> None:
    """v5 has one digester/compressor/chunk size per image: mismatching layers are refused early."""
    with open_bootstrap(str(nydus_fixtures / "v5-blake3-lz4.boot")) as img:
        tree = tree_from_image(img)
    cases = [
        (BuildOptions(fs_version=5, digester=Digester.SHA256, compressor=Compressor.LZ4_BLOCK), "digests"),
        (BuildOptions(fs_version=5, digester=Digester.BLAKE3, compressor=Compressor.ZSTD), "compressor"),
        (BuildOptions(fs_version=5, digester=Digester.BLAKE3, compressor=Compressor.LZ4_BLOCK, chunk_size=SMALL),
         "chunk size"),
    ]  # fmt: skip
    for opts, message in cases:
        with pytest.raises(FormatError, match=message):
            build_image(tree, str(tmp_path / "b"), str(tmp_path / "x"), opts)
        assert not (tmp_path / "b").exists()
    ok = BuildOptions(fs_version=5, digester=Digester.BLAKE3, compressor=Compressor.LZ4_BLOCK)
    r = build_image(tree, str(tmp_path / "b"), str(tmp_path / "x"), ok)
    assert r.blob_id is None and r.blob_ids == [
        "d7b86b1e74e316fe945741d1a9fa1b271459fe41481e304977659e0c6ecf56ac"
    ]


def test_hole_files_keep_has_hole(tmp_path: Path) -> None:
    """A crafted v5 layer with HAS_HOLE files (sparse chunk lists): re-emitted with HAS_HOLE and
    readable; dense files do not get the flag."""
    data = b"x" * 100
    root = v5craft.d(
        b"",
        v5craft.f(b"holey", holes=[(0, b"a" * 4096), (3 * 4096, data)], size=5 * 4096),
        v5craft.f(b"dense", b"d" * 5000),
    )
    boot, blob = v5craft.build(root, chunk_size=4096)
    (tmp_path / "lower.boot").write_bytes(boot)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / ("ab" * 32)).write_bytes(blob)
    with open_bootstrap(str(tmp_path / "lower.boot")) as img:
        tree = tree_from_image(img)
        assert isinstance(kids(tree)[b"holey"].data, ChunkedData)
    opts = BuildOptions(fs_version=5, chunk_size=4096, compressor=Compressor.NONE, digester=Digester.SHA256)
    build_image(tree, str(tmp_path / "out.boot"), str(tmp_path / "blobs"), opts)
    out = (tmp_path / "out.boot").read_bytes()
    with closing(open_v5(tmp_path / "out.boot")) as img:
        src = LocalBlobDir(str(tmp_path / "blobs"))
        holey, dense = lk(img, 1, b"holey"), lk(img, 1, b"dense")
        want = b"a" * 4096 + bytes(2 * 4096) + data + bytes(2 * 4096 - 100)
        assert read_file_range(src, img, holey, 0, 1 << 20) == want
        assert read_file_range(src, img, dense, 0, 1 << 20) == b"d" * 5000
        src.close()
        assert all(img.inode_digest_ok(s) for s in range(1, img.slot_count + 1))
    for name, has_hole in ((b"holey", True), (b"dense", False)):
        off = v5craft.record_offset(out, v5craft.slot_of(out, name))
        assert bool(struct.unpack_from("<Q", out, off + 80)[0] & 8) is has_hole


def test_option_errors(tmp_path: Path) -> None:
    for opts in (BuildOptions(fs_version=4), BuildOptions(fs_version=5, compressor=Compressor.GZIP)):
        with pytest.raises(ValueError):
            build_image(sample_tree(), str(tmp_path / "boot"), str(tmp_path / "blobs"), opts)


# -- the Nydus fixtures, rebuilt from their own unpacked trees ---------------------------------

FIXTURE_BLOB = "7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"


def records(boot: bytes) -> list[tuple]:
    sb = _SUPER.unpack_from(boot, 0)
    itab, n = sb[6], sb[9]
    out = []
    for s in range(n):
        off = struct.unpack_from("<I", boot, itab + 4 * s)[0] << 3
        f = _INODE.unpack_from(boot, off)
        out.append((off, boot[off + REC : off + REC + f[13]], *f))
    return out


def test_rebuild_of_nydus_fixture_is_byte_identical_but_for_newer_fields(
    nydus_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """unpack v5-sha256-none.boot, rebuild it as nydus-image 2.1 did (v5, sha256, none, 1 MiB,
    repeatable): slot order, every inode record and digest, all offsets and the blob (hence its
    id) come out identical. The only differences are fields newer builders fill in:
    s_inodes_count (nydus HEAD counts the root: 52, the fixture says 51), the blob's features
    (CAP_TAR_TOC since 2.2) and per-chunk CRC32C (HAS_CRC32 flag + crc since 2.4)."""
    orig_path = nydus_fixtures / "v5-sha256-none.boot"
    tar = tmp_path / "fx.tar"
    assert main(["unpack", "-B", str(orig_path), "-D", str(nydus_fixtures / "blobs"), "-o", str(tar)]) == 0
    boot, blobs = tmp_path / "re.boot", tmp_path / "blobs"
    argv = ["create", "--fs-version", "5", "--digester", "sha256", "--compressor", "none", "--repeatable",
            "-B", str(boot), "-D", str(blobs), str(tar)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert os.listdir(blobs) == [FIXTURE_BLOB]
    assert (blobs / FIXTURE_BLOB).read_bytes() == (nydus_fixtures / "blobs" / FIXTURE_BLOB).read_bytes()
    orig, new = orig_path.read_bytes(), boot.read_bytes()
    assert len(orig) == len(new)
    assert records(orig) == records(new)  # offsets, names, digests, every inode field
    # superblock: only s_inodes_count differs
    assert _SUPER.unpack_from(orig, 0)[5] == 51 and _SUPER.unpack_from(new, 0)[5] == 52
    patched = bytearray(new)
    struct.pack_into("<Q", patched, 24, 51)
    # extended blob table: features 0 then, CAP_TAR_TOC now
    xoff = _SUPER.unpack_from(orig, 0)[13]
    assert struct.unpack_from("<I", orig, xoff + 4)[0] == 0
    assert struct.unpack_from("<I", new, xoff + 4)[0] == BlobFeatures.CAP_TAR_TOC
    struct.pack_into("<I", patched, xoff + 4, 0)
    # chunk records: flags HAS_CRC32 and the CRC32C of the data
    with open_bootstrap(str(orig_path)) as img:
        assert isinstance(img, V5Image)
        src = LocalBlobDir(str(nydus_fixtures / "blobs"))
        n_chunks = 0
        for slot in range(1, img.slot_count + 1):
            rec = img._record(slot)
            if not stat.S_ISREG(rec.mode):
                continue
            for i, c in enumerate(img.chunks(rec.ino)):
                pos = rec.data_off + i * CHUNK_REC
                flags, crc = (
                    struct.unpack_from("<I", new, pos + 36)[0],
                    struct.unpack_from("<I", new, pos + 76)[0],
                )
                assert flags == ChunkFlags.HAS_CRC32 and c.flags == 0
                chunk = src.read(img.blobs[0], c.compressed_offset, c.compressed_size)
                assert crc == codec.crc32c(chunk)
                struct.pack_into("<I", patched, pos + 36, 0)
                struct.pack_into("<I", patched, pos + 76, 0)
                n_chunks += 1
        src.close()
    assert n_chunks == 29
    assert bytes(patched) == orig


def test_rebuild_of_2020_lz4_fixture(
    nydus_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 2020 fixture predates the dir-size / dir-nlink conventions and the extended blob table;
    slot order, names, parents, inode numbers, modes, owners, mtimes and inode digests still match,
    and the lz4 blob reads back to the same data."""
    orig_path = nydus_fixtures / "v5-blake3-lz4.boot"
    tar = tmp_path / "fx.tar"
    assert main(["unpack", "-B", str(orig_path), "-D", str(nydus_fixtures / "blobs"), "-o", str(tar)]) == 0
    boot, blobs = tmp_path / "re.boot", tmp_path / "blobs"
    argv = [
        "create",
        "--fs-version",
        "5",
        "--compressor",
        "lz4_block",
        "-B",
        str(boot),
        "-D",
        str(blobs),
        str(tar),
    ]
    assert main(argv) == 0
    capsys.readouterr()
    a, b = records(orig_path.read_bytes()), records(boot.read_bytes())
    assert len(a) == len(b) == 54
    for ra, rb in zip(a, b, strict=True):
        name, digest, parent, ino, uid, gid, _pj, mode, size, _blocks, flags, nlink = ra[1:13]
        assert (name, digest, parent, ino, uid, gid, mode, flags) == (*rb[1:7], rb[8], rb[11]), name
        if not stat.S_ISDIR(mode):
            assert (size, nlink) == (rb[9], rb[12]), name
        assert ra[13:] == rb[13:], name  # child index/count, name/symlink sizes, rdev, mtimes
    assert main(["check", "-B", str(boot), "-D", str(blobs)]) == 0


# -- a real FUSE mount -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.root
def test_fuse_mount_of_v5_matches_source(tmp_path: Path) -> None:
    require_device("/dev/fuse")
    from tests.fs.mountrig import CHUNK, build, compare, make_tree, nydusd

    src = str(tmp_path / "src")
    make_tree(src, many=300)
    for compressor in (Compressor.LZ4_BLOCK, Compressor.ZSTD):
        work = tmp_path / compressor.nydus_name
        work.mkdir()
        opts = BuildOptions(fs_version=5, chunk_size=CHUNK, compressor=compressor)
        img = build(src, str(work), opts, views=False)
        with open_bootstrap(img.boot) as boot:
            assert boot.version == 5
        with nydusd(img.boot, img.blob_dir, str(work / "mnt"), str(work)) as d:
            got = compare(src, d.mountpoint, exact=False, rng=random.Random(5))
            assert got.entries > 300 and got.files > 250 and got.xattrs >= 6 and got.ranges > 50
            kinds = {
                stat.S_IFMT(os.lstat(os.path.join(d.mountpoint, n)).st_mode) for n in os.listdir(d.mountpoint)
            }
            assert len(kinds) == 7
