"""Hostile RAFS v6 bootstraps: targeted corruptions and hypothesis mutations.

Whatever the bytes, opening the image and touching everything reachable (walk, attrs, lookups,
xattrs, links, chunks, chunk table) may only raise FormatError, quickly and in bounded memory.
"""

import struct
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydus_py.rafs.errors import FormatError
from nydus_py.rafs.loader import open_bytes
from nydus_py.rafs.v6 import V6Image

from .budget import HARD_LIMIT, call_budget, deadline
from .v6_encode import Built, Node, d, encode, f, link, special
from .walk import exercise

# opening and exercising the ~310-inode base image makes ~50,000 calls (Python and built-in):
# 100 times that means the reader did work out of proportion to the bytes it was given
CALL_LIMIT = 5_000_000
MEMORY_LIMIT = 32 << 20


def small_tree() -> Node:
    shared = f(b"shared data")
    many = {b"n%03d" % i: f(b"%d" % i) for i in range(300)}
    return d(
        {
            b"a": d({b"b": d({b"c": f(b"deep")}), b"many": d(many)}),
            b"file": f(b"Q" * 9000 + b"tail", xattrs={b"user.x": b"1", b"trusted.y": b"22"}),
            b"hl": shared,
            b"hl2": shared,
            b"sym": link(b"file"),
            b"longsym": link(b"p/" * 1200),
            b"fifo": special(0o010000),
            b"-first": f(b""),
        },
        xattrs={b"security.s": b"ctx"},
    )


BASE = encode(small_tree(), chunk_size=0x1000, prefetch=[b"/a", b"/file"])
BASE_COMPACT = encode(small_tree(), chunk_size=0x1000, compact=True)


def open_and_exercise(boot: bytes, blob: bytes | None = None, trace: bool = False) -> None:
    """Open + exercise; anything but FormatError, a hang or (with `trace`) a memory blow-up fails."""
    if trace:
        tracemalloc.start()
    try:
        with deadline(HARD_LIMIT * (3 if trace else 1)), call_budget(CALL_LIMIT):
            try:
                img = open_bytes(boot)
                exercise(img, blob)
            except FormatError:
                pass
    finally:
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        if trace:
            tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"peak {peak} bytes"


def test_base_images_are_valid() -> None:
    for b in (BASE, BASE_COMPACT):
        img = V6Image(b.bootstrap)
        assert exercise(img, b.blob) == len(b.nids)


# ---------------------------------------------------------------------------------- helpers


def mutate(b: Built, edits: Callable[[bytearray], None]) -> bytes:
    boot = bytearray(b.bootstrap)
    edits(boot)
    return bytes(boot)


def poke(b: Built, fmt: str, at: int, value: object) -> bytes:
    return mutate(b, lambda bt: struct.pack_into(fmt, bt, at, value))


def set_dirent(b: Built, dpath: bytes, name: bytes, nid: int | None = None, ftype: int | None = None) -> bytes:
    def edit(boot: bytearray) -> None:
        off = b.dirent_off[(dpath, name)]
        if nid is not None:
            struct.pack_into("<Q", boot, off, nid)
        if ftype is not None:
            boot[off + 10] = ftype

    return mutate(b, edit)


def walk_all(boot: bytes) -> None:
    exercise(V6Image(boot))


# ---------------------------------------------------------------------------------- tree shape


def test_dirent_pointing_to_ancestor_is_a_loop() -> None:
    boot = set_dirent(BASE, b"/a/b", b"c", nid=BASE.nids[b"/a"], ftype=2)
    with pytest.raises(FormatError, match="one parent"):
        walk_all(boot)
    img = V6Image(boot)
    with pytest.raises(FormatError):
        img.lookup(BASE.nids[b"/a/b"], b"c")


def test_dirent_pointing_to_root_or_itself() -> None:
    for target in (BASE.nids[b"/"], BASE.nids[b"/a/b"]):
        boot = set_dirent(BASE, b"/a/b", b"c", nid=target, ftype=2)
        with pytest.raises(FormatError, match="loop"):
            walk_all(boot)


def test_directory_listed_twice_is_a_dag() -> None:
    # /a/many -> /a/b: b's '..' is /a, so this passes the parent check but repeats a directory
    boot = set_dirent(BASE, b"/a", b"many", nid=BASE.nids[b"/a/b"], ftype=2)
    with pytest.raises(FormatError, match="listed twice"):
        walk_all(boot)


def test_dotdot_pointing_elsewhere() -> None:
    boot = set_dirent(BASE, b"/a/b", b"..", nid=BASE.nids[b"/"])
    with pytest.raises(FormatError, match="one parent"):
        walk_all(boot)
    boot = set_dirent(BASE, b"/", b"..", nid=BASE.nids[b"/a"])
    with pytest.raises(FormatError, match="root"):
        V6Image(boot).parent(BASE.nids[b"/"])


def test_dot_must_be_self() -> None:
    boot = set_dirent(BASE, b"/a/b", b".", nid=BASE.nids[b"/a"])
    with pytest.raises(FormatError, match="'.' points"):
        walk_all(boot)


def test_dirent_type_must_match_inode() -> None:
    boot = set_dirent(BASE, b"/a", b"b", ftype=1)  # says regular file, is a directory
    with pytest.raises(FormatError, match="says file"):
        walk_all(boot)
    with pytest.raises(FormatError, match="invalid file type"):
        walk_all(set_dirent(BASE, b"/a", b"b", ftype=9))


def test_nid_out_of_range_or_misplaced() -> None:
    for nid in (2**40, 2**64 - 1, (len(BASE.bootstrap) - BASE.meta_start) // 32):
        with pytest.raises(FormatError, match="outside the meta area|past the meta area"):
            walk_all(set_dirent(BASE, b"/", b"file", nid=nid))


def rename(b: Built, dpath: bytes, name: bytes, new: bytes) -> bytes:
    assert len(new) == len(name)

    def edit(boot: bytearray) -> None:
        off = b.name_off[(dpath, name)]
        boot[off : off + len(new)] = new

    return mutate(b, edit)


def test_names_with_slash_nul_or_dots() -> None:
    with pytest.raises(FormatError, match="invalid name"):
        walk_all(rename(BASE, b"/", b"hl2", b"h/2"))
    with pytest.raises(FormatError, match="NUL"):
        walk_all(rename(BASE, b"/", b"hl", b"\0l"))
    with pytest.raises(FormatError, match="not sorted"):
        walk_all(rename(BASE, b"/", b"hl2", b"aaa"))
    # a child literally named '..' (duplicate of the real one) breaks the strict order
    with pytest.raises(FormatError):
        walk_all(rename(BASE, b"/a", b"b", b"."))


def test_unsorted_across_blocks() -> None:
    many = b"/a/many"
    img = V6Image(BASE.bootstrap)
    size = img.getattr(BASE.nids[many]).size
    assert size > 4096
    # rename the first entry of the second block to sort before the end of the first block
    name = img._dir_block(img._inode(BASE.nids[many]), 1)[0][0]
    with pytest.raises(FormatError, match="not after|not sorted"):
        walk_all(rename(BASE, many, name, b"n000"[: len(name)]))


def test_nameoff_corruptions() -> None:
    off = BASE.dirent_off[(b"/a/b", b".")]
    for value in (0, 5, 12 * 100, 0xFFFF):
        boot = poke(BASE, "<H", off + 8, value)
        with pytest.raises(FormatError):
            walk_all(boot)
    second = BASE.dirent_off[(b"/a/b", b"..")]
    boot = mutate(BASE, lambda bt: struct.pack_into("<H", bt, second + 8, 1))  # before the first name
    with pytest.raises(FormatError, match="not increasing"):
        walk_all(boot)


# ---------------------------------------------------------------------------------- inodes


def set_inode(b: Built, path: bytes, fmt: str, at: int, value: int) -> bytes:
    return mutate(b, lambda bt: struct.pack_into(fmt, bt, b.inode_off[path] + at, value))


@pytest.mark.parametrize(
    ("path", "fmt", "at", "value", "match"),
    [
        (b"/file", "<H", 0, 0x11, "unknown i_format"),
        (b"/file", "<H", 0, (1 << 1) | 1, "compressed"),
        (b"/file", "<H", 0, (3 << 1) | 1, "compressed"),
        (b"/file", "<H", 0, (6 << 1) | 1, "unknown data layout"),
        (b"/file", "<Q", 8, 1 << 62, "chunk indexes"),
        (b"/a/many", "<Q", 8, 1 << 62, "data blocks|outside"),
        (b"/sym", "<Q", 8, 0, "symlink target size"),
        (b"/longsym", "<Q", 8, 5000, "symlink target size"),
        (b"/fifo", "<Q", 8, 1, "non-zero size"),
        (b"/file", "<H", 4, 0o170644, "invalid file type"),
        (b"/file", "<I", 44, 0, "link count 0"),
        (b"/file", "<I", 16, 0x20 | 0x40, "chunk format"),
        (b"/file", "<I", 16, 0x08, "block-map"),
        (b"/a/many", "<I", 16, 0xFFFF_FF00, "outside"),
        (b"/file", "<H", 2, 0xFFFF, "xattr|meta area"),
    ],
)
def test_inode_field_corruptions(path: bytes, fmt: str, at: int, value: int, match: str) -> None:
    boot = set_inode(BASE, path, fmt, at, value)
    with pytest.raises(FormatError, match=match):
        walk_all(boot)


def test_dir_with_chunk_layout_or_size_zero() -> None:
    with pytest.raises(FormatError, match="cannot be chunk-based"):
        walk_all(set_inode(BASE, b"/a/b", "<H", 0, (4 << 1) | 1))
    with pytest.raises(FormatError, match="size 0"):
        walk_all(set_inode(BASE, b"/a/b", "<Q", 8, 0))


def test_root_must_be_a_directory() -> None:
    boot = set_inode(BASE, b"/", "<H", 4, 0o120777)  # a well-formed symlink
    with pytest.raises(FormatError, match="root"):
        V6Image(boot)


def test_xattr_corruptions() -> None:
    xoff = BASE.inode_off[b"/file"] + 64
    with pytest.raises(FormatError, match="shared xattrs"):
        walk_all(mutate(BASE, lambda bt: bt.__setitem__(xoff + 4, 1)))
    with pytest.raises(FormatError, match="name index"):
        walk_all(mutate(BASE, lambda bt: bt.__setitem__(xoff + 12 + 1, 5)))
    with pytest.raises(FormatError, match="overruns"):
        walk_all(mutate(BASE, lambda bt: struct.pack_into("<H", bt, xoff + 12 + 2, 500)))
    assert V6Image(BASE.bootstrap).listxattr(BASE.nids[b"/file"]) == [b"user.x", b"trusted.y"]
    # second entry (at +8: 4-byte head + "x" + "1", padded) renamed to the first's name
    def dup(bt: bytearray) -> None:
        bt[xoff + 12 + 8 + 1] = 1
        bt[xoff + 12 + 8 + 4] = ord("x")

    with pytest.raises(FormatError, match="duplicate xattr"):
        walk_all(mutate(BASE, dup))


def test_symlink_with_nul() -> None:
    img = V6Image(BASE.bootstrap)
    ino = BASE.nids[b"/sym"]
    tail = BASE.inode_off[b"/sym"] + 64
    assert img.readlink(ino) == b"file"
    boot = mutate(BASE, lambda bt: bt.__setitem__(tail + 1, 0))
    with pytest.raises(FormatError, match="NUL"):
        V6Image(boot).readlink(ino)


# ---------------------------------------------------------------------------------- chunks


def chunk_index_off(b: Built, path: bytes, k: int) -> int:
    img = V6Image(b.bootstrap)
    ino = img._inode(b.nids[path])
    return (ino.data_off + 7) // 8 * 8 + 8 * k


@pytest.mark.parametrize(
    ("fmt", "at", "value", "match"),
    [
        ("<H", 2, 0, "names no blob"),
        ("<H", 2, 7, "names no blob"),
        ("<H", 0, 999, "not in the chunk table"),
        ("<I", 4, 12345, "not in the chunk table"),
    ],
)
def test_chunk_index_corruptions(fmt: str, at: int, value: int, match: str) -> None:
    off = chunk_index_off(BASE, b"/file", 1)
    boot = mutate(BASE, lambda bt: struct.pack_into(fmt, bt, off + at, value))
    with pytest.raises(FormatError, match=match):
        V6Image(boot).chunks(BASE.nids[b"/file"])
    with pytest.raises(FormatError, match=match):  # (the records packed for a build tree: the same checks)
        V6Image(boot).packed_chunks(BASE.nids[b"/file"])


def test_chunk_record_corruptions() -> None:
    ct = BASE.chunk_table_off
    cases = [
        ("<I", 32, 5, "blob index"),  # blob_index
        ("<Q", 56, 4097, "4K block address"),  # uncompressed offset
        ("<I", 72, 1 << 25, "exceeds 2"),  # index
    ]
    for fmt, at, value, match in cases:
        boot = poke(BASE, fmt, ct + at, value)
        with pytest.raises(FormatError, match=match):
            V6Image(boot).check_chunk_table()
    # duplicate key: copy record 0 over record 1
    boot = mutate(BASE, lambda bt: bt.__setitem__(slice(ct + 80, ct + 160), bt[ct : ct + 80]))
    with pytest.raises(FormatError, match="same chunk"):
        V6Image(boot).check_chunk_table()
    # every record's sizes wrong for the file that uses it
    def sizes(bt: bytearray) -> None:
        for i in range(BASE.chunk_count):
            struct.pack_into("<I", bt, ct + 80 * i + 44, 1)
            struct.pack_into("<I", bt, ct + 80 * i + 36, 1)
    with pytest.raises(FormatError, match="file needs"):
        V6Image(mutate(BASE, sizes)).chunks(BASE.nids[b"/file"])
    with pytest.raises(FormatError, match="file needs"):
        V6Image(mutate(BASE, sizes)).packed_chunks(BASE.nids[b"/file"])


def test_chunk_record_fields_checked_on_every_read() -> None:
    """chunks() (on every READ) checks the record's fields itself: unknown flags, a stored size that
    disagrees with an uncompressed chunk, a range past the blob."""
    ct = BASE.chunk_table_off

    def every(fmt: str, at: int, value: int) -> bytearray:
        def poke_all(bt: bytearray) -> None:
            for i in range(BASE.chunk_count):
                struct.pack_into(fmt, bt, ct + 80 * i + at, value)
        return mutate(BASE, poke_all)

    for boot, match in ((every("<I", 36, 0x100), "unknown chunk flags"),
                        (every("<I", 36, 0), "uncompressed chunk stored in"),
                        (every("<Q", 48, 1 << 39), "compressed range ends past blob size")):
        with pytest.raises(FormatError, match=match):
            V6Image(boot).chunks(BASE.nids[b"/file"])


# ---------------------------------------------------------------------------------- superblocks


SB, EXT, BT = 1024, 1152, 4096
SB_CASES = [
    ("<I", SB + 0, 0x12345678, "not a RAFS bootstrap|magic"),
    ("<I", SB + 4, 1, "checksum"),
    ("<I", SB + 8, 0x1, "not RAFS v6"),
    ("<B", SB + 12, 9, "tarfs"),
    ("<B", SB + 12, 13, "block size"),
    ("<B", SB + 13, 1, "extslots"),
    ("<Q", SB + 16, 0, "inode count 0"),
    ("<I", SB + 44, 3, "shared xattr"),
    ("<I", SB + 80, 0x4, "incompat"),
    ("<H", SB + 84, 1, "union"),
    ("<H", SB + 86, 2, "device slots"),
    ("<H", SB + 88, 12, "slot offset"),
    ("<I", SB + 40, 10**6, "meta_blkaddr"),
    ("<H", SB + 14, 65535, "outside the meta area|past the meta area|not a directory"),
    ("<Q", EXT + 0, 0x1 | 0x2 | 0x4, "compression bit"),
    ("<Q", EXT + 0, 0x1 | 0x4 | 0x8, "digest bit"),
    ("<Q", EXT + 0, 0x1 | 0x4 | 0x400, "unknown RAFS superblock flags"),
    ("<Q", EXT + 0, 0x1 | 0x4 | 0x200, "tarfs"),
    ("<I", EXT + 20, 0x3000, "chunk size"),
    ("<I", EXT + 20, 0x800, "chunk size"),
    ("<Q", EXT + 8, 4097, "blob table"),
    ("<I", EXT + 16, 100, "blob table"),
    ("<Q", EXT + 8, 10**9, "blob table"),
    ("<Q", EXT + 24, 4096, "overlaps"),
    ("<Q", EXT + 32, 81, "chunk table"),
    ("<Q", EXT + 32, 10**12, "chunk table"),
    ("<Q", EXT + 40, 4096, "overlaps"),
    ("<I", EXT + 48, 3, "prefetch table"),
    ("<64s", 1408, b"../" + b"a" * 61, "blob id"),
    ("<64s", 1408, b"b" * 64, "device slot 0 names blob"),
    ("<I", 1408 + 64, 0, "zero blocks"),
    ("<64s", BT, b"\0" * 64, "blob id"),
    ("<I", BT + 64, 1, "blob_index"),
    ("<I", BT + 68, 0x2000, "chunk size"),
    ("<I", BT + 72, (1 << 24) + 1, "chunk count"),
    ("<I", BT + 76, 9, "algorithm"),
    ("<I", BT + 80, 2, "algorithm"),
    ("<I", BT + 84, 0x2, "ALIGNED"),
    ("<I", BT + 84, 0x1 | 0x8000, "feature bits"),
    ("<I", BT + 84, 0x1 | 0x80, "inconsistent"),
    ("<Q", BT + 128, 10**7, "inconsistent"),
    ("<Q", BT + 120, 10**6, "compressed size"),
    ("<I", BT + 216, 7, "cipher"),
    ("<Q", BT + 96, 1 << 45, "format limits"),
]


@pytest.mark.parametrize(("fmt", "at", "value", "match"), SB_CASES)
def test_superblock_and_table_checks(fmt: str, at: int, value: object, match: str) -> None:
    boot = mutate(BASE, lambda bt: struct.pack_into(fmt, bt, at, value))
    with pytest.raises(FormatError, match=match):
        open_bytes(boot)


def test_sizes() -> None:
    for n in (0, 100, 1024 + 50, 4095, 4096, len(BASE.bootstrap) - 4096, len(BASE.bootstrap) - 1):
        with pytest.raises(FormatError):
            walk_all(BASE.bootstrap[:n])
    with pytest.raises(FormatError, match="multiple"):
        V6Image(BASE.bootstrap + b"\0")


def test_prefetch_table_entries_are_checked() -> None:
    img = V6Image(BASE.bootstrap)
    assert img.prefetch_table() == [BASE.nids[b"/a"], BASE.nids[b"/file"]]
    boot = mutate(BASE, lambda bt: struct.pack_into("<I", bt, BASE.prefetch_off, 0xFFFF_FFF0))
    with pytest.raises(FormatError):
        V6Image(boot).prefetch_table()
    boot = mutate(BASE, lambda bt: struct.pack_into("<I", bt, BASE.prefetch_off, 0))
    assert V6Image(boot).prefetch_table() == []


# ---------------------------------------------------------------------------------- properties

INTERESTING = sorted(
    {BASE.inode_off[p] + k for p in BASE.inode_off for k in range(0, 64, 2)}
    | {o + k for o in BASE.dirent_off.values() for k in (0, 8, 10)}
    | set(range(1024, 1024 + 128, 2))
    | set(range(1152, 1152 + 56, 4))
    | set(range(1408, 1408 + 128, 4))
    | set(range(4096, 4096 + 256, 4))
    | {BASE.chunk_table_off + 80 * i + k for i in range(5) for k in range(32, 80, 4)}
)
EXTREMES = [0, 1, 2, 0x7F, 0xFF, 0xFFFF, 0xFFFF_FFFF, 2**63, 2**64 - 1, 4096, 12, 128, 0x20, 0x29]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(
            st.one_of(st.sampled_from(INTERESTING), st.integers(0, len(BASE.bootstrap) - 8)),
            st.sampled_from(["<B", "<H", "<I", "<Q"]),
            st.one_of(st.sampled_from(EXTREMES), st.integers(0, 2**64 - 1)),
        ),
        min_size=1,
        max_size=6,
    ),
    compact=st.booleans(),
)
def test_mutated_images_raise_only_format_error(edits: list[tuple[int, str, int]], compact: bool) -> None:
    base = BASE_COMPACT if compact else BASE
    boot = bytearray(base.bootstrap)
    for off, fmt, value in edits:
        size = struct.calcsize(fmt)
        off = min(off, len(boot) - size)
        struct.pack_into(fmt, boot, off, value & ((1 << (8 * size)) - 1))
    open_and_exercise(bytes(boot), base.blob)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(INTERESTING), st.sampled_from(["<I", "<Q"]), st.sampled_from(EXTREMES)),
        min_size=1,
        max_size=3,
    )
)
def test_extreme_values_bounded_memory(edits: list[tuple[int, str, int]]) -> None:
    boot = bytearray(BASE.bootstrap)
    for off, fmt, value in edits:
        size = struct.calcsize(fmt)
        struct.pack_into(fmt, boot, min(off, len(boot) - size), value & ((1 << (8 * size)) - 1))
    open_and_exercise(bytes(boot), BASE.blob, trace=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    links=st.lists(
        st.tuples(st.sampled_from(sorted(BASE.dirent_off)), st.sampled_from(sorted(set(BASE.nids.values()))),
                  st.integers(0, 8)),  # fmt: skip
        min_size=1,
        max_size=4,
    )
)
def test_rewired_dirents_never_loop(links: list[tuple[tuple[bytes, bytes], int, int]]) -> None:
    """Point dirents (including '.' and '..') at arbitrary existing inodes with arbitrary types."""
    boot = bytearray(BASE.bootstrap)
    for key, nid, ftype in links:
        off = BASE.dirent_off[key]
        struct.pack_into("<Q", boot, off, nid)
        if ftype:
            boot[off + 10] = ftype
    open_and_exercise(bytes(boot), BASE.blob, trace=True)


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(0, len(BASE.bootstrap)), pad=st.booleans())
def test_truncated_images(cut: int, pad: bool) -> None:
    boot = BASE.bootstrap[:cut]
    if pad:
        boot += b"\0" * (-len(boot) % 4096)
    open_and_exercise(boot, BASE.blob, trace=True)
