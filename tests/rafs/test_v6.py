"""RAFS v6 reader against images from the independent test encoder (tests/rafs/v6_encode.py)."""

import os
import stat
import struct
import subprocess

import pytest

from nydus_py.rafs.chunkdata import read_file_range
from nydus_py.rafs.constants import ChunkFlags, Compressor, Digester
from nydus_py.rafs.errors import FormatError
from nydus_py.rafs.loader import open_bootstrap, open_bytes
from nydus_py.rafs.v6 import V6Image, decode_dev

from ..conftest import require_tool
from .v6_encode import Built, Node, d, encode, f, link, sample_tree
from .walk import MemBlobs, exercise

CS = 0x10_0000


def source_walk(root: Node, path: bytes = b"/") -> list[tuple[bytes, Node]]:
    out = [(path, root)]
    if root.children is not None:
        base = path if path.endswith(b"/") else path + b"/"
        for name in sorted(root.children):
            out += source_walk(root.children[name], base + name)
    return out


@pytest.fixture(scope="module", params=["extended", "compact"])
def built(request: pytest.FixtureRequest) -> tuple[Node, Built]:
    tree = sample_tree()
    compact = request.param == "compact"
    return tree, encode(tree, compact=compact, build_time=1_000_000 if compact else 0, prefetch=[b"/dir", b"/big.bin"])


def test_superblock_fields(built: tuple[Node, Built]) -> None:
    _tree, b = built
    img = V6Image(b.bootstrap)
    assert img.version == 6
    assert img.root_ino == b.nids[b"/"] == 128
    assert img.chunk_size == CS
    assert img.compressor == Compressor.ZSTD and img.digester == Digester.BLAKE3
    assert img.has_xattrs
    [blob] = img.blobs
    assert blob.blob_id == b.blob_id and blob.index == 0 and blob.chunk_count == b.chunk_count
    assert blob.compressed_size == len(b.blob)
    assert blob.blob_toc_size > 0 and len(blob.blob_toc_digest) == 32
    assert [s.blob_id for s in img.devices] == [b.blob_id]
    assert img.devices[0].blocks == blob.uncompressed_size // 4096
    assert img.prefetch_table() == [b.nids[b"/dir"], b.nids[b"/big.bin"]]


def test_tree_matches_source(built: tuple[Node, Built]) -> None:
    tree, b = built
    img = V6Image(b.bootstrap)
    expected = source_walk(tree)
    got = list(img.walk())
    assert [p for p, _ in got] == [p for p, _ in expected]
    nodes = dict(expected)
    src = MemBlobs({b.blob_id: b.blob})
    for path, ino in got:
        node = nodes[path]
        assert ino == b.nids[path]
        a = img.getattr(ino)
        assert a.ino == ino
        assert a.mode == node.mode, path
        assert (a.uid, a.gid) == (node.uid, node.gid)
        extended = struct.unpack_from("<H", b.bootstrap, b.inode_off[path])[0] & 1
        assert (a.mtime, a.mtime_nsec) == (node.mtime, node.mtime_nsec if extended else 0), path
        assert a.rdev == node.rdev
        assert sorted(img.listxattr(ino)) == sorted(node.xattrs)
        for k, v in node.xattrs.items():
            assert img.getxattr(ino, k) == v
        if stat.S_ISREG(node.mode):
            assert a.size == len(node.data) and a.blocks == -(-len(node.data) // 512)
            assert read_file_range(src, img, ino, 0, a.size + 10) == node.data
        elif stat.S_ISLNK(node.mode):
            assert img.readlink(ino) == node.target and a.size == len(node.target)
        elif stat.S_ISDIR(node.mode):
            assert node.children is not None
            assert a.nlink == 2 + sum(1 for c in node.children.values() if c.children is not None)
            assert [e.name for e in img.readdir(ino)] == sorted(node.children)
            assert [e.type for e in img.readdir(ino)] == [stat.S_IFMT(node.children[n].mode) for n in sorted(node.children)]
    hello = img.getattr(b.nids[b"/hello.txt"])
    assert hello.nlink == 2 and b.nids[b"/hardlink"] == b.nids[b"/hello.txt"]
    assert img.inode_count() == len(got) - 1


def test_sample_tree_covers_every_data_layout(built: tuple[Node, Built]) -> None:
    _tree, b = built
    img = V6Image(b.bootstrap)
    layouts = {p: img._inode(b.nids[p]).layout for p in (b"/long-link", b"/short-link", b"/plain-dir", b"/dir/many", b"/dir")}
    assert layouts == {b"/long-link": 0, b"/short-link": 2, b"/plain-dir": 0, b"/dir/many": 2, b"/dir": 2}
    assert img.getattr(b.nids[b"/dir/many"]).size > 4096 and img.getattr(b.nids[b"/plain-dir"]).size > 4032
    assert len(img.readlink(b.nids[b"/long-link"])) == 4090


def test_compact_inode_mtime_is_build_time_plus_delta() -> None:
    tree = d({b"a": f(b"1", mtime=1_000_123), b"b": f(b"2", mtime=1_000_000)})
    b = encode(tree, compact=True, build_time=1_000_000)
    img = V6Image(b.bootstrap)
    assert img.build_time == 1_000_000
    assert img.getattr(b.nids[b"/a"]).mtime == 1_000_123
    assert img.getattr(b.nids[b"/b"]).mtime == 1_000_000
    assert struct.unpack_from("<H", b.bootstrap, b.inode_off[b"/a"])[0] & 1 == 0  # really compact


def test_devices_decode_rdev(built: tuple[Node, Built]) -> None:
    _tree, b = built
    img = V6Image(b.bootstrap)
    blk = img.getattr(b.nids[b"/dev-blk"])
    assert (os.major(blk.rdev), os.minor(blk.rdev)) == (259, 70000)
    assert decode_dev(0x103) == os.makedev(1, 3)


def test_lookup_and_readdir_offsets(built: tuple[Node, Built]) -> None:
    tree, b = built
    img = V6Image(b.bootstrap)
    many = b.nids[b"/dir/many"]
    assert img.getattr(many).size > 4096  # several dirent blocks
    names = [e.name for e in img.readdir(many)]
    assert len(names) == 300
    for k in (0, 1, 150, 299, 300, 1000):
        assert [e.name for e in img.readdir(many, k)] == names[k:]
    for n in names:
        assert img.lookup(many, n) == b.nids[b"/dir/many/" + n]
    for absent in (b"a", b"f", b"f0000a", b"f01", b"f0299x", b"g", b"\xff", b"f0150\x00"):
        assert img.lookup(many, absent) is None
    root = img.root_ino
    assert img.lookup(root, b".") is None and img.lookup(root, b"..") is None
    assert img.lookup(root, b"-early") == b.nids[b"/-early"]  # sorts before '.'
    assert img.lookup(root, b"a/b") is None and img.lookup(root, b"") is None
    assert img.parent(root) == root
    assert img.parent(b.nids[b"/dir/sub"]) == b.nids[b"/dir"]
    assert img.parent(many) == b.nids[b"/dir"]


def test_wrong_kind_of_inode_is_format_error(built: tuple[Node, Built]) -> None:
    _tree, b = built
    img = V6Image(b.bootstrap)
    file_ino, dir_ino = b.nids[b"/hello.txt"], b.nids[b"/dir"]
    with pytest.raises(FormatError, match="not a symlink"):
        img.readlink(file_ino)
    with pytest.raises(FormatError, match="not a directory"):
        list(img.readdir(file_ino))
    with pytest.raises(FormatError, match="not a directory"):
        img.lookup(file_ino, b"x")
    with pytest.raises(FormatError, match="not a regular file"):
        img.chunks(dir_ino)
    for bad in (-1, 10**9, 2**64):
        with pytest.raises(FormatError):
            img.getattr(bad)


def test_chunks_ranges(built: tuple[Node, Built]) -> None:
    tree, b = built
    img = V6Image(b.bootstrap)
    ino = b.nids[b"/big.bin"]
    data = tree.children[b"big.bin"].data  # type: ignore[index]
    all_chunks = img.chunks(ino)
    assert [c.file_offset for c in all_chunks] == [0, CS, 2 * CS, 3 * CS]
    assert [c.uncompressed_size for c in all_chunks] == [CS, CS, CS, len(data) - 3 * CS]
    assert all(c.flags & ChunkFlags.HAS_CRC32 for c in all_chunks)
    assert [c.index for c in all_chunks] == sorted({c.index for c in all_chunks})
    assert img.chunks(ino, CS - 1, 2) == all_chunks[0:2]
    assert img.chunks(ino, CS, 1) == [all_chunks[1]]
    assert img.chunks(ino, 3 * CS, None) == [all_chunks[3]]
    assert img.chunks(ino, len(data), 100) == []
    assert img.chunks(ino, 0, 0) == []
    zeros = img.chunks(b.nids[b"/zeros"])
    assert len(zeros) == 2 and zeros[0]._replace(file_offset=CS) == zeros[1]  # dedup'd
    assert img.chunks(b.nids[b"/empty"]) == []
    src = MemBlobs({b.blob_id: b.blob})
    assert read_file_range(src, img, ino, CS - 5, 10) == data[CS - 5 : CS + 5]


def test_hole_index_reads_as_zeros() -> None:
    b = encode(d({b"f": f(b"A" * (2 * CS + 7))}), chunk_size=CS)
    boot = bytearray(b.bootstrap)
    idx = (b.inode_off[b"/f"] + 64 + 7) // 8 * 8 + 8  # second chunk index
    struct.pack_into("<I", boot, idx + 4, 0xFFFF_FFFF)
    img = V6Image(bytes(boot))
    ino = b.nids[b"/f"]
    assert [c.file_offset for c in img.chunks(ino)] == [0, 2 * CS]
    got = read_file_range(MemBlobs({b.blob_id: b.blob}), img, ino, 0, 3 * CS)
    assert got == b"A" * CS + b"\0" * CS + b"A" * 7


def test_uid_gid_without_explicit_flag_are_own() -> None:
    b = encode(d({b"f": f(b"x", uid=1234, gid=5678)}), explicit_uid_gid=False)
    img = V6Image(b.bootstrap)
    a = img.getattr(b.nids[b"/f"])
    assert (a.uid, a.gid) == (os.geteuid(), os.getegid())
    b2 = encode(d({b"f": f(b"x", uid=1234, gid=5678)}))
    a2 = V6Image(b2.bootstrap).getattr(b2.nids[b"/f"])
    assert (a2.uid, a2.gid) == (1234, 5678)


@pytest.mark.parametrize("comp", [Compressor.NONE, Compressor.LZ4_BLOCK, Compressor.ZSTD])
@pytest.mark.parametrize("dig", [Digester.BLAKE3, Digester.SHA256])
def test_algorithms_roundtrip(comp: Compressor, dig: Digester) -> None:
    data = (b"abc" * 5000) + os.urandom(3000)
    b = encode(d({b"f": f(data), b"g": f(b"tiny")}), compressor=comp, digester=dig, chunk_size=0x4000, crc=False)
    img = V6Image(b.bootstrap)
    assert img.compressor == comp and img.digester == dig and img.blobs[0].compressor == comp
    src = MemBlobs({b.blob_id: b.blob})
    assert read_file_range(src, img, b.nids[b"/f"], 0, len(data)) == data
    assert len(img.chunks(b.nids[b"/f"])) == -(-len(data) // 0x4000)
    assert exercise(img, b.blob) == 3


def test_open_bootstrap_mmap_and_close(tmp_path: "os.PathLike[str]", built: tuple[Node, Built]) -> None:
    _tree, b = built
    p = os.path.join(tmp_path, "boot")
    with open(p, "wb") as fh:
        fh.write(b.bootstrap)
    img = open_bootstrap(p)
    assert isinstance(img, V6Image)
    with img:
        assert exercise(img, b.blob) == len(list(img.walk()))
    assert img._closed
    assert isinstance(open_bytes(b.bootstrap), V6Image)


def test_check_chunk_table_wants_digest_order() -> None:
    b = encode(d({b"a": f(b"one"), b"b": f(b"two"), b"c": f(b"three")}))
    img = V6Image(b.bootstrap)
    assert img.check_chunk_table() == 3
    boot = bytearray(b.bootstrap)
    off = b.chunk_table_off
    r0, r1 = boot[off : off + 80], boot[off + 80 : off + 160]
    boot[off : off + 80], boot[off + 80 : off + 160] = r1, r0
    img2 = V6Image(bytes(boot))
    assert exercise_files(img2, b) == 3  # reads still resolve by key
    with pytest.raises(FormatError, match="order"):
        img2.check_chunk_table()


def exercise_files(img: V6Image, b: Built) -> int:
    src = MemBlobs({b.blob_id: b.blob})
    n = 0
    for _p, ino in img.walk():
        if stat.S_ISREG(img.getattr(ino).mode):
            read_file_range(src, img, ino, 0, 1 << 30)
            n += 1
    return n


def test_empty_root_and_no_chunks() -> None:
    b = encode(d({b"l": link(b"x"), b"e": f(b"")}))
    img = V6Image(b.bootstrap)
    assert [p for p, _ in img.walk()] == [b"/", b"/e", b"/l"]
    assert img.check_chunk_table() == 0
    assert img.chunks(b.nids[b"/e"]) == []


def test_mkfs_erofs_image_is_rejected(tmp_path: "os.PathLike[str]") -> None:
    mkfs = require_tool("mkfs.erofs")
    tree = os.path.join(tmp_path, "tree")
    os.makedirs(os.path.join(tree, "d"))
    with open(os.path.join(tree, "d", "f"), "wb") as fh:
        fh.write(b"x" * 10000)
    img = os.path.join(tmp_path, "img.erofs")
    blob = os.path.join(tmp_path, "blob.img")
    subprocess.run([mkfs, "--chunksize=1048576", f"--blobdev={blob}", "-T0", img, tree], check=True, capture_output=True)
    with pytest.raises(FormatError, match="not RAFS v6"):
        open_bootstrap(img)
    plain = os.path.join(tmp_path, "plain.erofs")
    subprocess.run([mkfs, "-T0", plain, tree], check=True, capture_output=True)
    with pytest.raises(FormatError):
        open_bootstrap(plain)


def test_project_builder_output(tmp_path: "os.PathLike[str]") -> None:
    """The project's builder (nydus_py.builder) and this reader agree, including blob trailers."""
    from nydus_py.builder.build import build_image
    from nydus_py.builder.options import BuildOptions
    from nydus_py.builder.sources import tree_from_directory
    from nydus_py.rafs import blobmeta

    root = os.path.join(tmp_path, "src")
    os.makedirs(os.path.join(root, "d", "e"))
    files = {"a.bin": os.urandom(300_000), "d/e/z": b"z" * 5000, "d/same": b"z" * 5000, "empty": b""}
    for rel, data in files.items():
        with open(os.path.join(root, rel), "wb") as fh:
            fh.write(data)
    os.symlink("a.bin", os.path.join(root, "ln"))
    os.link(os.path.join(root, "a.bin"), os.path.join(root, "hard"))
    blob_dir = os.path.join(tmp_path, "blobs")
    os.makedirs(blob_dir)
    boot = os.path.join(tmp_path, "boot")
    res = build_image(tree_from_directory(root), boot, blob_dir, BuildOptions(chunk_size=0x10000))
    with open_bootstrap(boot) as img:
        assert isinstance(img, V6Image)
        with open(os.path.join(blob_dir, res.blob_id or ""), "rb") as fh:
            blob = fh.read()
        assert exercise(img, blob) == 9  # /, a.bin, d, d/e, d/e/z, d/same, empty, hard, ln
        src = MemBlobs({img.blobs[0].blob_id: blob})
        for rel, data in files.items():
            ino = root_ino = img.root_ino
            for part in rel.encode().split(b"/"):
                found = img.lookup(ino, part)
                assert found is not None
                ino = found
            assert ino != root_ino and read_file_range(src, img, ino, 0, len(data) + 1) == data
        assert img.readlink(img.lookup(img.root_ino, b"ln") or 0) == b"a.bin"
        assert img.lookup(img.root_ino, b"hard") == img.lookup(img.root_ino, b"a.bin")
        info = img.blobs[0]
        _h, table = blobmeta.read_blob_meta(blob, info)
        digests = blobmeta.read_blob_digests(blob, info)
        recs = [img.chunk_record(i) for i in range(img.chunk_table_len())]
        assert blobmeta.cross_check_chunks(recs, info, table, digests) == len(recs) == img.check_chunk_table()


def test_mapping_a_read_to_chunks_builds_no_flag_objects(built: tuple[Node, Built],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """chunks() is on every READ: IntFlag operators and ChunkFlags(x) are Enum calls (a few µs
    each, eight per chunk before); after the first record the flag values are memoized."""
    import enum

    from nydus_py.rafs.constants import BlobFeatures

    _tree, b = built
    img = open_bytes(b.bootstrap)
    ino = b.nids[b"/big.bin"]
    first = img.chunks(ino)
    assert len(first) > 1 and all(isinstance(c.flags, ChunkFlags) for c in first)
    made: list[type] = []
    real = enum.EnumType.__call__

    def counting(cls, *args, **kw):  # type: ignore[no-untyped-def]
        if cls in (ChunkFlags, BlobFeatures):
            made.append(cls)
        return real(cls, *args, **kw)

    monkeypatch.setattr(enum.EnumType, "__call__", counting)
    again = img.chunks(ino)
    monkeypatch.undo()
    assert again == first
    assert made == []
