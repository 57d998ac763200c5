"""v5 features no Nydus fixture has: xattrs, HAS_HOLE files, devices, several blobs, prefetch,
huge directories. Bootstraps are built by the test-only writer in v5craft.py."""

import os
import stat
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydus_py.rafs.chunkdata import read_file_range
from nydus_py.rafs.constants import SuperFlags
from nydus_py.rafs.errors import FormatError
from nydus_py.rafs.loader import open_bytes
from nydus_py.rafs.model import BlobInfo, RafsImage
from nydus_py.rafs.v5 import V5Image

from .test_v5_hostile import exercise_bounded, mutant
from .v5craft import (
    DEFAULT_FLAGS,
    F_FLAGS,
    S_EXT_ENTRIES,
    Node,
    build,
    d,
    f,
    hardlink,
    ln,
    patch,
    patch_record,
    record_offset,
)

XATTRS = [
    (b"user.mime", b"text/plain"),
    (b"security.selinux", b"system_u:object_r:etc_t:s0\0"),
    (b"trusted.overlay.opaque", b"y"),
    (b"user.empty", b""),
    (b"system.posix_acl_access", bytes(range(28))),
]


class MemBlobs:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def read(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        return self.blob[offset : offset + size]


def rich_tree() -> Node:
    data = bytes(range(256)) * 40  # 10240 bytes: 3 chunks of 4 KiB
    tagged = f(b"tagged", data, xattrs=XATTRS)
    return d(
        b"",
        d(
            b"dev",
            Node(b"null", stat.S_IFCHR | 0o666, rdev=(1 << 8) | 3),
            Node(b"sda", stat.S_IFBLK | 0o660, rdev=(8 << 8) | 0),
            Node(b"fifo", stat.S_IFIFO | 0o600),
            Node(b"sock", stat.S_IFSOCK | 0o700),
        ),
        d(b"empty"),
        d(b"x", tagged, hardlink(b"tagged-link", tagged), ln(b"up", b".."), xattrs=[(b"user.dir", b"1")]),
        f(b"zero", b""),
        f(
            b"sparse",
            holes=[(4096, b"A" * 4096), (3 * 4096, b"B" * 100), (5 * 4096 + 17, b"C" * 10)],
            size=6 * 4096,
        ),
        uid=7,
        gid=8,
    )


def v5(boot: bytes) -> V5Image:
    img = open_bytes(boot)
    assert isinstance(img, V5Image)
    return img


def paths(img: RafsImage) -> dict[bytes, int]:
    return dict(img.walk())


def test_xattrs_are_decoded() -> None:
    boot, blob = build(rich_tree())
    img = v5(boot)
    p = paths(img)
    tagged = p[b"/x/tagged"]
    assert img.listxattr(tagged) == [k for k, _ in XATTRS]
    for k, v in XATTRS:
        assert img.getxattr(tagged, k) == v
    assert img.getxattr(tagged, b"user.missing") is None
    assert img.getxattr(tagged, b"user.") is None
    # hard link: same inode, same xattrs
    assert p[b"/x/tagged-link"] == tagged
    assert img.listxattr(p[b"/x"]) == [b"user.dir"]
    assert img.getxattr(p[b"/x"], b"user.dir") == b"1"
    assert img.listxattr(p[b"/zero"]) == []
    # chunk records come after the xattr table: data still reads back
    attr = img.getattr(tagged)
    assert read_file_range(MemBlobs(blob), img, tagged, 0, attr.size) == bytes(range(256)) * 40
    assert all(img.inode_digest_ok(s) for s in range(1, img.slot_count + 1))


def xattr_table_offset(boot: bytes, slot: int) -> int:
    off = record_offset(boot, slot)
    name_size = struct.unpack_from("<H", boot, off + 100)[0]
    return off + 128 + ((name_size + 7) & ~7)


def tagged_boot() -> tuple[bytes, int, int]:
    boot, _ = build(d(b"", f(b"t", b"data", xattrs=[(b"user.a", b"1"), (b"user.bb", b"22")])))
    return boot, 2, xattr_table_offset(boot, 2)


@pytest.mark.parametrize(
    "rel,fmt,value,msg",
    [
        (8, "<I", 0, "xattr pair of 0 bytes"),
        (8, "<I", 1000, "overruns the xattr table"),
        (12, "<B", ord("x"), "no allowed prefix"),  # "user.a" -> "xser.a"
        (18, "<B", ord("z"), "without a NUL-terminated name"),  # the NUL after "user.a"
        (12, "<B", 0, "without a NUL-terminated name"),  # empty name
    ],
)
def test_corrupt_xattr_pairs(rel: int, fmt: str, value: int, msg: str) -> None:
    boot, slot, xoff = tagged_boot()
    img = open_bytes(patch(boot, xoff + rel, fmt, value))
    with pytest.raises(FormatError, match=msg):
        img.listxattr(slot)
    with pytest.raises(FormatError, match=msg):
        img.getxattr(slot, b"user.bb")


def test_xattr_table_size_overrun() -> None:
    boot, slot, xoff = tagged_boot()
    for size in (2**64 - 1, 2**40, len(boot)):
        with pytest.raises(FormatError, match="xattr table"):
            open_bytes(patch(boot, xoff, "<Q", size)).getattr(slot)
    # a table size that cuts a pair's header in half
    img = open_bytes(patch(boot, xoff, "<Q", 2))
    with pytest.raises(FormatError, match="truncated xattr pair header"):
        img.listxattr(slot)


def test_hole_files_use_file_offsets() -> None:
    boot, blob = build(rich_tree())
    img = open_bytes(boot)
    ino = paths(img)[b"/sparse"]
    size = img.getattr(ino).size
    want = bytearray(size)
    want[4096 : 2 * 4096] = b"A" * 4096
    want[3 * 4096 : 3 * 4096 + 100] = b"B" * 100
    want[5 * 4096 + 17 : 5 * 4096 + 27] = b"C" * 10
    src = MemBlobs(blob)
    assert read_file_range(src, img, ino, 0, size) == bytes(want)
    for off, n in ((0, 10), (4095, 2), (8192, 4096), (3 * 4096 + 50, 5000), (5 * 4096, 4096), (size - 1, 1)):
        assert read_file_range(src, img, ino, off, n) == bytes(want[off : off + n]), (off, n)
    offsets = lambda off, n: [c.file_offset for c in img.chunks(ino, off, n)]  # noqa: E731
    assert offsets(0, 4096) == []
    assert offsets(0, 4097) == [4096]
    assert offsets(8191, 1) == [4096]
    assert offsets(8192, 4096) == []
    assert offsets(8192, 4097) == [3 * 4096]
    assert offsets(0, size) == [4096, 3 * 4096, 5 * 4096 + 17]
    assert offsets(5 * 4096 + 26, 100) == [5 * 4096 + 17]
    assert offsets(5 * 4096 + 27, 100) == []


def test_special_files_and_empty_things() -> None:
    boot, _ = build(rich_tree())
    img = open_bytes(boot)
    p = paths(img)
    kinds = {
        name: stat.S_IFMT(img.getattr(p[b"/dev/" + name]).mode)
        for name in (b"null", b"sda", b"fifo", b"sock")
    }
    assert kinds == {
        b"null": stat.S_IFCHR,
        b"sda": stat.S_IFBLK,
        b"fifo": stat.S_IFIFO,
        b"sock": stat.S_IFSOCK,
    }
    assert img.getattr(p[b"/dev/null"]).rdev == (1 << 8) | 3
    assert [e.type for e in img.readdir(p[b"/dev"])] == [
        stat.S_IFIFO,
        stat.S_IFCHR,
        stat.S_IFBLK,
        stat.S_IFSOCK,
    ]
    with pytest.raises(FormatError, match="not a regular file"):
        img.chunks(p[b"/dev/null"])
    assert list(img.readdir(p[b"/empty"])) == []
    assert img.lookup(p[b"/empty"], b"anything") is None
    assert img.chunks(p[b"/zero"]) == [] and img.getattr(p[b"/zero"]).size == 0
    assert img.readlink(p[b"/x/up"]) == b".."
    assert img.getattr(img.root_ino).uid == 7  # EXPLICIT_UID_GID set by default
    with pytest.raises(FormatError, match="not a directory"):
        list(img.readdir(p[b"/zero"]))
    with pytest.raises(FormatError, match="not a directory"):
        img.lookup(p[b"/zero"], b"a")
    assert img.inode_count() == len(set(p.values()))


def test_implicit_uid_gid_reports_own_credentials() -> None:
    boot, _ = build(rich_tree(), flags=SuperFlags.COMPRESSION_NONE | SuperFlags.HASH_SHA256)
    attr = open_bytes(boot).getattr(1)
    assert (attr.uid, attr.gid) == (os.geteuid(), os.getegid())


def test_blob_table_with_several_blobs_and_no_extended_table() -> None:
    ids = ["cd" * 32, "short-id", "x" * 200]
    boot, _ = build(rich_tree(), extra_blobs=ids)
    img = open_bytes(boot)
    assert [b.blob_id for b in img.blobs] == ["ab" * 32, *ids]
    assert [(b.readahead_offset, b.readahead_size) for b in img.blobs] == [
        (512 * i, 4096 * i) for i in range(4)
    ]
    assert img.blobs[0].chunk_count == 6 and img.blobs[0].compressed_size > 0
    boot, _ = build(rich_tree(), extra_blobs=ids, ext_table=False)
    img = open_bytes(boot)
    assert [b.blob_id for b in img.blobs] == ["ab" * 32, *ids]
    assert all(b.chunk_count == 0 and b.compressed_size == 0 for b in img.blobs)
    boot, _ = build(rich_tree(), extra_blobs=ids)
    with pytest.raises(FormatError, match="fewer than the blob table"):
        open_bytes(patch(boot, S_EXT_ENTRIES, "<I", 2))


@pytest.mark.parametrize("bad", ["a/b", "..", "caf\u00e9", "sp ace", "x" * 300])
def test_invalid_blob_ids(bad: str) -> None:
    boot, _ = build(rich_tree(), extra_blobs=[bad])
    with pytest.raises(FormatError, match="invalid blob id"):
        open_bytes(boot)


def test_prefetch_table() -> None:
    boot, _ = build(rich_tree(), prefetch=[1, 3, 5])
    assert open_bytes(boot).prefetch_table() == [1, 3, 5]
    boot, _ = build(rich_tree(), prefetch=[2, 0])
    with pytest.raises(FormatError, match="prefetch table: inode 0"):
        open_bytes(boot).prefetch_table()


def test_unknown_inode_flags_do_not_move_data() -> None:
    """i_flags bits the reader does not use (HARDLINK) change nothing."""
    boot, blob = build(rich_tree())
    img0 = open_bytes(boot)
    ino = paths(img0)[b"/x/tagged"]
    boot2 = patch_record(
        boot, ino, F_FLAGS, "<Q", struct.unpack_from("<Q", boot, record_offset(boot, ino) + 80)[0] | 2
    )
    img = open_bytes(boot2)
    assert read_file_range(MemBlobs(blob), img, ino, 0, 10240) == bytes(range(256)) * 40


class CountingImage(V5Image):
    reads = 0

    def _record(self, slot: int) -> Any:
        CountingImage.reads += 1
        return super()._record(slot)


@pytest.fixture(scope="module")
def big_boot() -> bytes:
    kids = [f(b"f%06d" % i) for i in range(100_000)]
    boot, _ = build(d(b"", d(b"big", *kids), f(b"a")), flags=DEFAULT_FLAGS)
    return boot


def test_large_image_loads_without_touching_inodes(big_boot: bytes) -> None:
    # Load cost is measured in records decoded (deterministic); wall time belongs to benchmarks/.
    CountingImage.reads = 0
    img = CountingImage(big_boot)
    assert CountingImage.reads == 1  # only the root record
    big = img.lookup(1, b"big")
    assert big is not None
    CountingImage.reads = 0
    assert img.lookup(big, b"f054321") is not None
    assert img.lookup(big, b"f054321x") is None
    assert img.lookup(big, b"f100000") is None
    assert CountingImage.reads <= 3 * 20  # binary search over 100k names, not a scan
    entries = list(img.readdir(big, 99_998))
    assert [e.name for e in entries] == [b"f099998", b"f099999"]


# ---------------------------------------------------------------- fuzzing the rich tree


@st.composite
def rich_mutants(draw: st.DrawFn) -> bytes:
    boot, _ = build(rich_tree())
    data = bytearray(boot)
    ops: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        fmt = draw(st.sampled_from(["<B", "<H", "<I", "<Q"]))
        width = struct.calcsize(fmt)
        pos = draw(st.integers(0, len(data) - width))
        if draw(st.booleans()):
            pos = max(8192, pos)
        value = draw(
            st.one_of(st.integers(0, 2 ** (8 * width) - 1), st.sampled_from([0, 1, 2 ** (8 * width) - 1]))
        )
        struct.pack_into(fmt, data, pos, value)
        ops.append(f"{fmt}@{pos}={value:#x}")
    return mutant(data, ops)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rich_mutants())
def test_mutated_rich_tree_raises_only_format_error(data: bytes) -> None:
    exercise_bounded(data)


@st.composite
def sparse_layouts(draw: st.DrawFn) -> tuple[list[tuple[int, bytes]], int]:
    """Sorted, non-overlapping chunks of 1..4096 bytes at random offsets (HAS_HOLE files)."""
    pos, chunks = 0, list[tuple[int, bytes]]()
    for _ in range(draw(st.integers(0, 40))):
        pos += draw(st.integers(0, 9000))
        n = draw(st.integers(1, 4096))
        chunks.append((pos, bytes([len(chunks) % 251 + 1]) * n))
        pos += n
    return chunks, pos + draw(st.integers(0, 5000))


@settings(max_examples=150, deadline=None)
@given(sparse_layouts(), st.integers(0, 200_000), st.integers(0, 50_000))
def test_hole_chunk_search_matches_scan(
    layout: tuple[list[tuple[int, bytes]], int], off: int, n: int
) -> None:
    chunks, size = layout
    boot, blob = build(d(b"", f(b"s", holes=chunks, size=size)))
    img = open_bytes(boot)
    want = [o for o, data in chunks if o < min(size, off + n) and o + len(data) > off and off < size and n > 0]
    assert [c.file_offset for c in img.chunks(2, off, n)] == want
    content = bytearray(size)
    for o, data in chunks:
        content[o : o + len(data)] = data
    assert read_file_range(MemBlobs(blob), img, 2, off, n) == bytes(content[off : off + n])


def test_root_with_empty_name_loads_and_walks() -> None:
    """Older nydus-image wrote the root record with i_name_size 0 (issue 16, item 9)."""
    boot, blob = build(rich_tree(), root_name=b"")
    root_off = record_offset(boot, 1)
    assert struct.unpack_from("<H", boot, root_off + 100)[0] == 0  # the root really has no name
    img = v5(boot)
    p = paths(img)
    assert p == paths(v5(build(rich_tree())[0]))
    assert img.getattr(img.root_ino).uid == 7
    assert img.lookup(img.root_ino, b"x") == p[b"/x"]
    assert img.parent(p[b"/x"]) == img.root_ino
    sparse = p[b"/sparse"]
    data = read_file_range(MemBlobs(blob), img, sparse, 0, img.getattr(sparse).size)
    assert data[4096:8192] == b"A" * 4096
    assert all(img.inode_digest_ok(s) for s in range(1, img.slot_count + 1))


def test_non_root_empty_name_is_refused() -> None:
    """Only the root may have an empty name: a nameless child is still a FormatError."""
    boot, _ = build(d(b"", f(b"", b"data"), f(b"b", b"more")), root_name=b"")
    img = v5(boot)
    with pytest.raises(FormatError, match="inode 2: name size 0 is not in 1..255"):
        list(img.walk())
    with pytest.raises(FormatError, match="inode 2: name size 0"):
        img.lookup(img.root_ino, b"a")
