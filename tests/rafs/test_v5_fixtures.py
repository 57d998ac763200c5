"""Conformance of the v5 reader against real Nydus bootstraps and blobs (shared/fixtures/nydus)."""

import hashlib
import json
import os
import stat
import struct
from pathlib import Path

import blake3
import pytest

from nydus_py.rafs.chunkdata import read_chunk, read_file_range
from nydus_py.rafs.constants import Compressor, Digester, SuperFlags
from nydus_py.rafs.errors import FormatError
from nydus_py.rafs.loader import open_bootstrap, open_bytes
from nydus_py.rafs.model import RafsImage
from nydus_py.rafs.v5 import V5Image
from nydus_py.storage.localfs import LocalBlobDir

from .v5craft import F_DIGEST, F_UID, record_offset

BOOTS = {
    "v5-sha256-none.boot": (Compressor.NONE, Digester.SHA256, False),
    "v5-blake3-lz4.boot": (Compressor.LZ4_BLOCK, Digester.BLAKE3, True),
}


def expected(fixtures: Path) -> tuple[list[dict], dict[bytes, str]]:
    """The `tree -J` listing and the md5sum lines that follow it in v5-tree.json."""
    text = (fixtures / "v5-tree.json").read_text()
    tree, end = json.JSONDecoder().raw_decode(text)
    md5s = {}
    for line in text[end:].splitlines():
        if line.strip():
            digest, path = line.split(None, 1)
            md5s[path.encode()] = digest
    return tree, md5s


def normalize_expected(node: dict) -> tuple:
    kids = tuple(
        sorted(normalize_expected(c) for c in node.get("contents", []) if node["type"] == "directory")
    )
    return (node["type"], node["name"].encode(), node.get("target", "").encode(), kids)


def image_tree(img: RafsImage, ino: int, name: bytes) -> tuple:
    mode = img.getattr(ino).mode
    if stat.S_ISDIR(mode):
        kids = tuple(sorted(image_tree(img, e.ino, e.name) for e in img.readdir(ino)))
        return ("directory", name, b"", kids)
    if stat.S_ISLNK(mode):
        return ("link", name, img.readlink(ino), ())
    assert stat.S_ISREG(mode), f"{name!r}: unexpected mode {mode:o}"
    return ("file", name, b"", ())


@pytest.fixture(params=sorted(BOOTS))
def boot(request: pytest.FixtureRequest, nydus_fixtures: Path) -> Path:
    return nydus_fixtures / request.param


@pytest.fixture
def img(boot: Path):
    image = open_bootstrap(str(boot))
    yield image
    image.close()


@pytest.fixture
def blobs(nydus_fixtures: Path):
    src = LocalBlobDir(str(nydus_fixtures / "blobs"))
    yield src
    src.close()


def paths(img: RafsImage) -> dict[bytes, int]:
    return dict(img.walk())


def test_superblock_and_blob_table(img: RafsImage, boot: Path, nydus_fixtures: Path) -> None:
    compressor, digester, explicit = BOOTS[boot.name]
    assert isinstance(img, V5Image)
    assert img.version == 5 and img.root_ino == 1
    assert img.chunk_size == 1 << 20
    assert img.compressor == compressor and img.digester == digester
    assert bool(img.flags & SuperFlags.EXPLICIT_UID_GID) == explicit
    assert len(img.blobs) == 1
    blob = img.blobs[0]
    assert (blob.index, blob.compressor, blob.digester, blob.chunk_size) == (0, compressor, digester, 1 << 20)
    # Spec 5.5: a v5 blob id is the sha256 of the whole blob file.
    data = (nydus_fixtures / "blobs" / blob.blob_id).read_bytes()
    assert hashlib.sha256(data).hexdigest() == blob.blob_id
    if blob.compressed_size:  # extended blob table present (2022 fixture)
        assert blob.compressed_size == len(data)


def test_tree_matches_expected(img: RafsImage, nydus_fixtures: Path) -> None:
    tree, _ = expected(nydus_fixtures)
    want = normalize_expected(tree[0])
    got = image_tree(img, img.root_ino, b"")
    assert got[3] == want[3]
    assert sum(1 for _ in img.walk()) == 54


def test_lookup_resolves_every_path(img: RafsImage) -> None:
    for path, ino in img.walk():
        cur = img.root_ino
        for comp in [c for c in path.split(b"/") if c]:
            nxt = img.lookup(cur, comp)
            assert nxt is not None, path
            cur = nxt
        assert cur == ino, path
        if stat.S_ISDIR(img.getattr(ino).mode):
            for bad in (b".", b"..", b"", b"no-such-name", b"a/b", b"\xff" * 300):
                assert img.lookup(ino, bad) is None


def test_readdir_offsets_and_order(img: RafsImage) -> None:
    for _, ino in img.walk():
        if not stat.S_ISDIR(img.getattr(ino).mode):
            continue
        full = list(img.readdir(ino))
        names = [e.name for e in full]
        assert names == sorted(names)
        for k in range(len(full) + 2):
            assert list(img.readdir(ino, k)) == full[k:]
        for e in full:
            assert e.type == stat.S_IFMT(img.getattr(e.ino).mode)


def test_parent_of_directories(img: RafsImage) -> None:
    p = paths(img)
    assert img.parent(img.root_ino) == img.root_ino
    for path, ino in p.items():
        if path != b"/" and stat.S_ISDIR(img.getattr(ino).mode):
            up = path.rsplit(b"/", 1)[0] or b"/"
            assert img.parent(ino) == p[up], path


def test_hard_links_share_inode_and_content(img: RafsImage, blobs: LocalBlobDir) -> None:
    p = paths(img)
    foo, test_sh = p[b"/hardlink-test/foo"], p[b"/hardlink-test/test.sh"]
    assert foo == test_sh
    attr = img.getattr(foo)
    assert attr.ino == foo
    assert attr.nlink == sum(1 for ino in p.values() if ino == foo) >= 2
    a = read_file_range(blobs, img, foo, 0, attr.size)
    b = read_file_range(blobs, img, test_sh, 0, attr.size)
    assert a == b and len(a) == attr.size
    # Every name of a regular file reports the same inode; distinct inodes are counted once.
    assert img.inode_count() == len(set(p.values()))


def test_every_chunk_digest_verifies(img: RafsImage, blobs: LocalBlobDir) -> None:
    chunks = 0  # counted per name, as the fixture README does (hard links repeat their chunks)
    for _, ino in img.walk():
        attr = img.getattr(ino)
        if not stat.S_ISREG(attr.mode):
            continue
        covered = 0
        for c in img.chunks(ino):
            assert c.file_offset == covered
            data = read_chunk(blobs, img, c, validate=True)
            assert len(data) == c.uncompressed_size
            h = blake3.blake3(data) if img.digester == Digester.BLAKE3 else hashlib.sha256(data)
            assert h.digest() == c.digest
            covered += c.uncompressed_size
            chunks += 1
        assert covered == attr.size
    assert chunks == 29


def test_files_read_back_with_expected_md5(img: RafsImage, blobs: LocalBlobDir, nydus_fixtures: Path) -> None:
    _, md5s = expected(nydus_fixtures)
    seen = {}
    for path, ino in img.walk():
        attr = img.getattr(ino)
        if stat.S_ISREG(attr.mode):
            data = read_file_range(blobs, img, ino, 0, attr.size + 100)
            assert len(data) == attr.size
            seen[path] = hashlib.md5(data).hexdigest()
    assert len(seen) == 23
    for path, digest in md5s.items():
        assert seen[path] == digest, path


def test_same_content_across_both_bootstraps(nydus_fixtures: Path, blobs: LocalBlobDir) -> None:
    sums = []
    for name in sorted(BOOTS):
        with open_bootstrap(str(nydus_fixtures / name)) as img:
            sums.append(
                {
                    path: hashlib.md5(read_file_range(blobs, img, ino, 0, img.getattr(ino).size)).hexdigest()
                    for path, ino in img.walk()
                    if stat.S_ISREG(img.getattr(ino).mode)
                }
            )
    assert sums[0] == sums[1] and len(sums[0]) == 23


def test_partial_reads_match_whole_file(img: RafsImage, blobs: LocalBlobDir) -> None:
    ino = paths(img)[
        b"/normal-file-test/busybox/1f777dbdd68d1c4d554bc0d20e027bfef9ed2dfe2d8d5f029e958552a0e12475/layer.tar"
    ]
    size = img.getattr(ino).size
    whole = read_file_range(blobs, img, ino, 0, size)
    cs = img.chunk_size
    for off, n in ((0, 1), (cs - 1, 2), (cs, 1), (size - 5, 100), (size, 10), (12345, cs + 7)):
        assert read_file_range(blobs, img, ino, off, n) == whole[off : off + n]
    assert [c.file_offset for c in img.chunks(ino, 0, 1)] == [0]
    assert [c.file_offset for c in img.chunks(ino, cs - 1, 2)] == [0, cs]
    assert [c.file_offset for c in img.chunks(ino, cs, 1)] == [cs]
    assert img.chunks(ino, size, 10) == []
    assert img.chunks(ino, 0, 0) == []


def test_inode_digests_verify(img: RafsImage, boot: Path) -> None:
    assert isinstance(img, V5Image)
    assert img.slot_count == 54
    assert all(img.inode_digest_ok(slot) for slot in range(1, img.slot_count + 1))
    # and the check can fail: corrupt one recorded digest
    data = boot.read_bytes()
    off = record_offset(data, 20) + F_DIGEST
    bad = V5Image(data[:off] + bytes([data[off] ^ 1]) + data[off + 1 :])
    assert not bad.inode_digest_ok(20)
    assert bad.inode_digest_ok(21)


def test_uid_gid(img: RafsImage, boot: Path) -> None:
    data = boot.read_bytes()
    for slot_ino in (1, 5, 20):
        attr = img.getattr(slot_ino)
        if img.flags & SuperFlags.EXPLICIT_UID_GID:
            raw = struct.unpack_from("<II", data, record_offset(data, slot_ino) + F_UID)
            assert (attr.uid, attr.gid) == raw
        else:
            assert (attr.uid, attr.gid) == (os.geteuid(), os.getegid())


def test_symlinks_xattrs_prefetch(img: RafsImage) -> None:
    p = paths(img)
    assert img.readlink(p[b"/symlink-test/root-1"]) == b"/" * 17
    assert img.readlink(p[b"/symlink-test/test.sh"]) == b"../normal-file-test/test.sh"
    with pytest.raises(FormatError):
        img.readlink(p[b"/hardlink-test/foo"])
    with pytest.raises(FormatError):
        img.chunks(p[b"/symlink-test"])
    for ino in p.values():
        assert img.listxattr(ino) == []
        assert img.getxattr(ino, b"user.x") is None
    assert img.prefetch_table() == []


def test_open_bytes_equals_mmap_and_close(boot: Path) -> None:
    a = open_bytes(boot.read_bytes())
    b = open_bootstrap(str(boot))
    assert list(a.walk()) == list(b.walk())
    assert [a.getattr(i) for _, i in a.walk()] == [b.getattr(i) for _, i in b.walk()]
    b.close()
    b.close()
    with pytest.raises(FormatError):
        b.getattr(1)
