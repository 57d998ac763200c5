"""v6 bootstrap writer: on-disk fields checked with an independent struct-level walker."""

import io
import os
import stat
import struct

import pytest

from nydus_py.builder.blob_writer import BlobWriter
from nydus_py.builder.build import build_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.tree import ChunkedData, FileData, Inode
from nydus_py.builder.v6_writer import dir_size, encode_xattrs
from nydus_py.rafs.constants import Compressor, SuperFlags
from nydus_py.rafs.errors import FormatError

CS = 0x1000
T = 1_700_000_000


def reg(data: bytes, **kw) -> Inode:
    return Inode(mode=stat.S_IFREG | 0o644, data=FileData(len(data), lambda: io.BytesIO(data)), **kw)


def sample_tree() -> Inode:
    root = Inode.directory(0o755, mtime=T)
    shared = reg(b"hello", uid=1000, gid=1000, mtime=T, mtime_nsec=5)
    big = Inode.directory(0o700)
    for i in range(300):
        big.children[b"entry-%04d-" % i + b"n" * 30] = reg(b"%d" % (i % 7))
    root.children.update(
        {
            b"a": shared,
            b"link": shared,
            b"big": big,
            b"!first": reg(os.urandom(3 * CS + 5)),
            b"sym": Inode(mode=stat.S_IFLNK | 0o777, symlink=b"a"),
            b"longsym": Inode(mode=stat.S_IFLNK | 0o777, symlink=b"x" * 3000),
            b"dev": Inode(mode=stat.S_IFCHR | 0o600, rdev=os.makedev(4, 64)),
            b"x": Inode(mode=stat.S_IFREG | 0o600, xattrs={b"user.k": b"v" * 1000, b"trusted.t": b""}),
        }
    )
    return root


class Boot:
    """Just enough of a v6 reader to check the writer's layout rules."""

    def __init__(self, data: bytes) -> None:
        self.d = data
        (
            self.magic,
            self.cksum,
            self.compat,
            self.blkbits,
            _ext,
            self.root_nid,
            self.inos,
            _bt,
            _btn,
            self.blocks,
            self.meta_blkaddr,
            _xa,
        ) = struct.unpack_from("<IIIBBHQQIIII", data, 1024)
        self.incompat, _u, self.extra_devices, self.devt_slotoff = struct.unpack_from(
            "<IHHH", data, 1024 + 80
        )
        (
            self.flags,
            self.bt_off,
            self.bt_size,
            self.chunk_size,
            self.ct_off,
            self.ct_size,
            self.pf_off,
            self.pf_size,
        ) = struct.unpack_from("<QQIIQQQI", data, 1152)

    def inode(self, nid: int) -> dict:
        pos = self.meta_blkaddr * 4096 + nid * 32
        f = struct.unpack_from("<HHHHQIIIIQII", self.d, pos)
        ino = dict(
            zip(
                ["fmt", "icount", "mode", "_r", "size", "u", "ino", "uid", "gid", "mtime", "nsec", "nlink"],
                f,
                strict=True,
            )
        )
        ino["pos"] = pos
        ino["xsize"] = 12 + 4 * (ino["icount"] - 1) if ino["icount"] else 0
        ino["layout"] = ino["fmt"] >> 1
        return ino

    def data(self, ino: dict) -> bytes:
        size, base = ino["size"], ino["pos"] + 64 + ino["xsize"]
        if ino["layout"] == 2:  # FLAT_INLINE
            nfull, tail = divmod(size, 4096)
            assert base % 4096 + tail <= 4096, "inline tail crosses a block"
            head = self.d[ino["u"] * 4096 : (ino["u"] + nfull) * 4096] if nfull else b""
            return head + self.d[base : base + tail]
        assert ino["layout"] == 0
        return self.d[ino["u"] * 4096 : ino["u"] * 4096 + size]

    def dirents(self, ino: dict) -> list[tuple[bytes, int, int]]:
        raw = self.data(ino)
        out = []
        for b in range(0, len(raw), 4096):
            blk = raw[b : b + 4096]
            n = struct.unpack_from("<H", blk, 8)[0] // 12
            heads = [struct.unpack_from("<QHB", blk, 12 * i) for i in range(n)]
            for i, (nid, off, ft) in enumerate(heads):
                end = heads[i + 1][1] if i + 1 < n else len(blk)
                name = blk[off:end].split(b"\0", 1)[0]
                out.append((name, nid, ft))
        return out

    def walk(self):
        stack = [(b"/", self.root_nid, self.root_nid)]
        while stack:
            path, nid, parent = stack.pop()
            ino = self.inode(nid)
            yield path, nid, ino
            if stat.S_ISDIR(ino["mode"]):
                ents = self.dirents(ino)
                assert [e[0] for e in ents] == sorted(e[0] for e in ents)
                names = {e[0]: e[1] for e in ents}
                assert names[b"."] == nid and names[b".."] == parent
                for name, cnid, _ft in ents:
                    if name not in (b".", b".."):
                        stack.append(((path.rstrip(b"/") + b"/" + name), cnid, nid))


def build(tmp_path, root: Inode, **kw) -> tuple[object, Boot]:
    opts = BuildOptions(chunk_size=kw.pop("chunk_size", CS), **kw)
    r = build_image(root, str(tmp_path / "boot"), str(tmp_path / "blobs"), opts)
    return r, Boot(open(tmp_path / "boot", "rb").read())


def test_superblocks_and_tables(tmp_path):
    r, b = build(tmp_path, sample_tree())
    assert len(b.d) % 4096 == 0
    assert (b.magic, b.cksum, b.compat, b.blkbits, b.incompat) == (0xE0F5E1E2, 0, 0x4000_0000, 12, 0xC)
    assert (b.root_nid, b.extra_devices, b.devt_slotoff, b.chunk_size) == (128, 1, 11, CS)
    assert b.flags == int(
        SuperFlags.COMPRESSION_ZSTD
        | SuperFlags.HASH_BLAKE3
        | SuperFlags.EXPLICIT_UID_GID
        | SuperFlags.HAS_XATTR
        | SuperFlags.INLINED_CHUNK_DIGEST
    )
    assert b.bt_off == 4096 and b.bt_size == 256 and b.ct_off % 4096 == 0 and b.ct_size % 80 == 0
    assert b.meta_blkaddr == 2 and b.d[2 * 4096 : 3 * 4096] == bytes(4096)  # first meta block empty
    slot_id, blocks, mapped = struct.unpack_from("<64sII", b.d, 1408)
    assert slot_id.decode() == r.blob_id and blocks == b.blocks > 0
    assert mapped * 4096 >= len(b.d) and mapped * 4096 % 0x80000 == 0
    bid, idx, cs, count, comp, dig, feats = struct.unpack_from("<64sIIIIII", b.d, b.bt_off)
    assert (bid.decode(), idx, cs, comp, dig, feats) == (r.blob_id, 0, CS, 3, 0, 0x7000_0021)
    assert count == r.chunks
    # chunk table: sorted by (digest, blob+1), one record per distinct chunk
    recs = [b.d[b.ct_off + i : b.ct_off + i + 80] for i in range(0, b.ct_size, 80)]
    keys = [(x[:32], struct.unpack_from("<I", x, 32)[0] + 1) for x in recs]
    assert keys == sorted(keys) and len(set(keys)) == len(keys) == r.chunks


def test_inodes_dirs_and_files(tmp_path):
    _r, b = build(tmp_path, sample_tree())
    seen = {p: (nid, ino) for p, nid, ino in b.walk()}
    assert len({nid for nid, _ in seen.values()}) == b.inos == 308  # hard link counted once
    for path, (_nid, ino) in seen.items():
        assert ino["fmt"] & 1, path  # extended inodes only
        assert ino["pos"] % 4096 + 64 + ino["xsize"] <= 4096, path
    root = seen[b"/"][1]
    assert root["nlink"] == 3 and root["mtime"] == T
    big = seen[b"/big"][1]
    assert big["size"] > 3 * 4096 and big["nlink"] == 2
    assert seen[b"/a"][0] == seen[b"/link"][0] and seen[b"/a"][1]["nlink"] == 2
    a = seen[b"/a"][1]
    assert (a["uid"], a["gid"], a["nsec"], a["layout"], a["u"]) == (1000, 1000, 5, 4, 0x20)
    assert b.data(seen[b"/longsym"][1]) == b"x" * 3000 and seen[b"/sym"][1]["layout"] == 2
    dev = seen[b"/dev"][1]
    assert (dev["u"], dev["layout"], dev["size"]) == (os.makedev(4, 64), 0, 0)
    x = seen[b"/x"][1]
    assert x["xsize"] == 12 + (4 + 1 + 1000 + 3) + (4 + 1 + 3) and x["size"] == 0
    # chunk indexes of the 3-chunk file: device_id 1, increasing blkaddr
    f = seen[b"/!first"][1]
    ipos = (f["pos"] + 64 + f["xsize"] + 7) // 8 * 8
    idx = [struct.unpack_from("<HHI", b.d, ipos + 8 * k) for k in range(4)]
    assert [i[1] & 0xFF for i in idx] == [1, 1, 1, 1]
    assert [i[2] for i in idx] == sorted(i[2] for i in idx)


def test_repeatable_clears_owner(tmp_path):
    _r, b = build(tmp_path, sample_tree(), repeatable=True)
    assert not b.flags & SuperFlags.EXPLICIT_UID_GID
    assert all(ino["uid"] == ino["gid"] == 0 for _p, _n, ino in b.walk())


def test_dir_size_packing():
    assert dir_size([b".", b".."]) == 27
    names = [b"%03d" % i + b"y" * 240 for i in range(20)]  # 255 bytes each: 16 per block
    assert dir_size(names) == 4096 + 4 * 255
    assert dir_size([b"z" * 4084]) == 4096


def test_xattr_encoding_and_rejects():
    body = encode_xattrs({b"user.a": b"1", b"system.posix_acl_access": b"\x02\0\0\0"})
    assert body[:12] == bytes(12)
    assert body[12:16] == bytes([0, 2, 4, 0])  # acl first (sorted names), suffix-less, index 2
    for bad in (b"system.foo", b"user.", b"other.x", b"trusted." + b"n" * 256):
        with pytest.raises(FormatError):
            encode_xattrs({bad: b""})


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.children.__setitem__(b"a/b", reg(b"")),
        lambda r: r.children.__setitem__(b"n" * 256, reg(b"")),
        lambda r: r.children.__setitem__(b"..", reg(b"")),
        lambda r: r.children.__setitem__(b"s", Inode(mode=stat.S_IFLNK | 0o777, symlink=b"")),
        lambda r: r.children.__setitem__(b"s", Inode(mode=stat.S_IFLNK | 0o777, symlink=b"z" * 4096)),
        lambda r: r.children.__setitem__(b"loop", r),
        lambda r: r.children.__setitem__(b"x", Inode(mode=stat.S_IFREG, xattrs={b"bogus.x": b""})),
        lambda r: r.children.__setitem__(b"m", Inode(mode=0o170000)),
        lambda r: r.children.__setitem__(b"u", reg(b"", uid=1 << 32)),
    ],
)
def test_bad_trees_fail_before_any_blob(tmp_path, mutate):
    root = sample_tree()
    mutate(root)
    with pytest.raises(FormatError):
        build(tmp_path, root)
    assert not (tmp_path / "boot").exists()
    assert not (tmp_path / "blobs").exists() or os.listdir(tmp_path / "blobs") == []


def test_option_errors(tmp_path):
    for opts in (
        BuildOptions(fs_version=4),
        BuildOptions(compressor=Compressor.GZIP),
        BuildOptions(chunk_size=3000),
    ):
        with pytest.raises(ValueError):
            build_image(sample_tree(), str(tmp_path / "boot"), str(tmp_path / "blobs"), opts)


def test_no_data_means_no_blob(tmp_path):
    root = Inode.directory()
    root.children[b"e"] = reg(b"")
    root.children[b"d"] = Inode.directory()
    r, b = build(tmp_path, root)
    assert r.blob_id is None and r.blob_path is None and r.blob_ids == [] and r.chunks == 0
    assert b.extra_devices == 0 and b.bt_size == 0 and b.ct_size == 0 and b.root_nid == 128
    assert not (tmp_path / "blobs").exists() or os.listdir(tmp_path / "blobs") == []


def test_prefetch_table_and_blob_order(tmp_path):
    root = sample_tree()
    paths = [b"/big", b"/big/entry-0001-" + b"n" * 30, b"/missing", b"relative", b"/a"]
    r, b = build(tmp_path, root, prefetch_paths=paths)
    seen = {p: nid for p, nid, _ in b.walk()}
    assert b.pf_off == b.bt_off + b.bt_size and b.pf_size == 8
    assert list(struct.unpack_from("<2I", b.d, b.pf_off)) == [seen[b"/big"], seen[b"/a"]]
    # the prefetched directory's files lead the blob
    first = b.inode(seen[b"/big/entry-0000-" + b"n" * 30])
    ipos = (first["pos"] + 64 + 7) // 8 * 8
    assert struct.unpack_from("<HHI", b.d, ipos)[2] == 0


def test_existing_blobs_union_and_dedup(tmp_path):
    """Files already in other blobs (`ChunkedData`) are referenced, not copied."""
    old = os.urandom(2 * CS)
    infos, chunk_lists = [], []
    for name in ("l1", "l2"):
        w = BlobWriter(str(tmp_path / "blobs"), BuildOptions(chunk_size=CS), blob_index=0)
        chunk_lists.append(
            w.add_file(FileData(len(old), lambda: io.BytesIO(old)))
            if name == "l1"
            else w.add_file(FileData(5, lambda: io.BytesIO(b"12345")))
        )
        infos.append(w.finish())
    root = Inode.directory()
    root.children[b"old"] = Inode(
        mode=stat.S_IFREG | 0o644, data=ChunkedData(len(old), chunk_lists[0], [infos[0]])
    )
    root.children[b"old2"] = Inode(mode=stat.S_IFREG | 0o644, data=ChunkedData(5, chunk_lists[1], [infos[1]]))
    root.children[b"new"] = reg(old[CS:] + b"tail")  # first chunk dedups against blob l1
    r, b = build(tmp_path, root)
    assert r.blob_ids == [infos[0].blob_id, infos[1].blob_id, r.blob_id]
    assert r.chunks == 1 and r.deduplicated == 1
    assert b.extra_devices == 3
    seen = {p: ino for p, _n, ino in b.walk()}
    n = seen[b"/new"]
    ipos = (n["pos"] + 64 + 7) // 8 * 8
    assert [struct.unpack_from("<HHI", b.d, ipos + 8 * k)[1] for k in range(2)] == [1, 3]
    o2 = seen[b"/old2"]
    assert struct.unpack_from("<HHI", b.d, (o2["pos"] + 64 + 7) // 8 * 8)[1] == 2


def test_chunked_data_must_match_chunk_size(tmp_path):
    w = BlobWriter(str(tmp_path / "blobs"), BuildOptions(chunk_size=0x2000), blob_index=0)
    chunks = w.add_file(FileData(10, lambda: io.BytesIO(b"0123456789")))
    info = w.finish()
    root = Inode.directory()
    root.children[b"f"] = Inode(mode=stat.S_IFREG | 0o644, data=ChunkedData(10, chunks, [info]))
    with pytest.raises(FormatError, match="chunk size"):
        build(tmp_path, root)


def test_chunked_data_with_hole_fails_before_new_blob(tmp_path):
    w = BlobWriter(str(tmp_path / "old"), BuildOptions(chunk_size=CS), blob_index=0)
    chunks = w.add_file(FileData(3 * CS, lambda: io.BytesIO(os.urandom(3 * CS))))
    info = w.finish()
    root = Inode.directory()
    root.children[b"holey"] = Inode(
        mode=stat.S_IFREG | 0o644, data=ChunkedData(3 * CS, chunks[:1] + chunks[2:], [info])
    )
    root.children[b"new"] = reg(b"fresh data")
    with pytest.raises(FormatError, match="chunks for"):
        build(tmp_path, root)
    assert not (tmp_path / "blobs").exists() or os.listdir(tmp_path / "blobs") == []
