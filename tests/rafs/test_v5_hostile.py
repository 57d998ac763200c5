"""Hostile v5 bootstraps: mutated real fixtures and hand-made corruptions.

Whatever the bytes, opening and walking the whole image may only raise FormatError, and must
finish quickly (no hang, no unbounded allocation).
"""

import stat
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydus_py.rafs.errors import FormatError
from nydus_py.rafs.layout_v5 import V5_INODE_HAS_HOLE
from nydus_py.rafs.loader import open_bytes

from ..conftest import NYDUS_FIXTURES
from .budget import call_budget, deadline
from .v5craft import (
    F_CHILD_COUNT,
    F_CHILD_INDEX,
    F_FLAGS,
    F_INO,
    F_MODE,
    F_NAME_SIZE,
    F_NLINK,
    F_PARENT,
    F_SIZE,
    F_SYMLINK_SIZE,
    S_BLOCK_SIZE,
    S_BTAB_SIZE,
    S_EXT_ENTRIES,
    S_FLAGS,
    S_ITAB_ENTRIES,
    S_ITAB_OFF,
    S_PTAB_ENTRIES,
    S_PTAB_OFF,
    S_SB_SIZE,
    d,
    f,
    hardlink,
    ln,
    patch,
    patch_record,
    record_offset,
    slot_of,
)
from .v5craft import build as craft
from .walk import exercise as walk_everything

FIXTURE_BOOTS = {
    name: (NYDUS_FIXTURES / name).read_bytes() for name in ("v5-sha256-none.boot", "v5-blake3-lz4.boot")
}
# exercising a whole 54-inode fixture makes ~13,000 calls (Python and built-in): about 80 times
# that means the reader did work out of proportion to the bytes it was given
CALL_LIMIT = 1_000_000


def exercise(data: bytes) -> None:
    """Open and use every reader entry point on every reachable inode; FormatError ends it."""
    try:
        img = open_bytes(data)
    except FormatError:
        return
    try:
        walk_everything(img)
    except FormatError:
        pass
    finally:
        img.close()


def exercise_bounded(data: bytes) -> None:
    """exercise() within CALL_LIMIT calls (and the hang guard)."""
    with deadline(), call_budget(CALL_LIMIT):
        exercise(data)


# ---------------------------------------------------------------- mutation strategies

EXTREMES_32 = [0, 1, 2, 7, 8, 0xFF, 0x1000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFE, 0xFFFF_FFFF]
EXTREMES_64 = EXTREMES_32 + [1 << 32, 1 << 40, 0x7FFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF]


def value32() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(EXTREMES_32), st.integers(0, 0xFFFF_FFFF), st.integers(0, 100))


def value64() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(EXTREMES_64), st.integers(0, 2**64 - 1), st.integers(0, 100))


class Mutant(bytes):
    """Mutated bootstrap bytes whose repr names the mutations, not 18 KB of data."""

    ops: list[str]

    def __repr__(self) -> str:
        return f"Mutant({', '.join(self.ops)})"


def mutant(data: bytes | bytearray, ops: list[str]) -> Mutant:
    m = Mutant(data)
    m.ops = ops
    return m


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(sorted(FIXTURE_BOOTS)))
    data = bytearray(FIXTURE_BOOTS[name])
    ops = [name]
    n0 = n = len(data)
    for _ in range(draw(st.integers(1, 4))):
        region = draw(
            st.one_of(
                st.integers(0, 80),  # superblock fields
                st.integers(8192, 8192 + 54 * 4),  # inode table
                st.integers(8192, n0 - 1),  # anywhere in the tables and records
            )
        )
        kind = draw(st.sampled_from(["flip", "u32", "u64", "u16", "truncate"]))
        if n == 0:
            break
        if kind == "flip":
            pos = min(region, n - 1)
            x = draw(st.integers(1, 255))
            data[pos] ^= x
            ops.append(f"[{pos}]^={x:#x}")
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))) :]
            n = len(data)
            ops.append(f"len={n}")
        else:
            fmt = {"u16": "<H", "u32": "<I", "u64": "<Q"}[kind]
            width = struct.calcsize(fmt)
            if n < width:
                continue
            pos = min(region - region % width, n - width)
            value = draw(value64() if kind == "u64" else value32()) & ((1 << (8 * width)) - 1)
            struct.pack_into(fmt, data, pos, value)
            ops.append(f"{kind}@{pos}={value:#x}")
    return mutant(data, ops)


RECORD_FIELDS = [
    (F_PARENT, "<Q"),
    (F_INO, "<Q"),
    (F_MODE, "<I"),
    (F_SIZE, "<Q"),
    (F_FLAGS, "<Q"),
    (F_NLINK, "<I"),
    (F_CHILD_INDEX, "<I"),
    (F_CHILD_COUNT, "<I"),
    (F_NAME_SIZE, "<H"),
    (F_SYMLINK_SIZE, "<H"),
]


@st.composite
def record_field_overwrites(draw: st.DrawFn) -> bytes:
    """Extreme values in the fields of inode and chunk records (where the logic lives)."""
    name = draw(st.sampled_from(sorted(FIXTURE_BOOTS)))
    data = FIXTURE_BOOTS[name]
    ops = [name]
    for _ in range(draw(st.integers(1, 3))):
        slot = draw(st.integers(1, 54))
        if draw(st.booleans()):
            field_off, fmt = draw(st.sampled_from(RECORD_FIELDS))
            off = record_offset(data, slot) + field_off
        else:
            # somewhere in the record's tail: names, chunk records (blob index, sizes, offsets)
            off = record_offset(data, slot) + 128 + 4 * draw(st.integers(0, 60))
            fmt = draw(st.sampled_from(["<I", "<Q"]))
        if off + struct.calcsize(fmt) > len(data):
            continue
        value = draw(value64() if fmt == "<Q" else value32()) & ((1 << (8 * struct.calcsize(fmt))) - 1)
        data = patch(data, off, fmt, value)
        ops.append(f"{fmt}@{off}={value:#x}")
    return mutant(data, ops)


COMMON = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@COMMON
@given(mutated())
def test_mutated_fixtures_raise_only_format_error(data: bytes) -> None:
    exercise_bounded(data)


@COMMON
@given(record_field_overwrites())
def test_record_field_extremes_raise_only_format_error(data: bytes) -> None:
    exercise_bounded(data)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(FIXTURE_BOOTS)), st.integers(0, 18648))
def test_truncated_fixtures(name: str, length: int) -> None:
    exercise_bounded(FIXTURE_BOOTS[name][:length])


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(sorted(FIXTURE_BOOTS)),
    st.integers(1, 54),
    st.sampled_from([F_CHILD_COUNT, F_CHILD_INDEX]),
    st.sampled_from([0x7FFF_FFFF, 0xFFFF_FFFF, 0x10_0000, 55, 54, 53, 2, 1, 0]),
)
def test_huge_counts_are_fast(name: str, slot: int, field_off: int, value: int) -> None:
    """Counts that would mean billions of children or chunks fail (or work) within the time bound."""
    exercise_bounded(patch_record(FIXTURE_BOOTS[name], slot, field_off, "<I", value))


def test_unmodified_fixtures_walk_cleanly() -> None:
    for data in FIXTURE_BOOTS.values():
        img = open_bytes(data)
        assert sum(1 for _ in img.walk()) == 54
        exercise_bounded(data)


# ---------------------------------------------------------------- hand-crafted corruptions


def tree() -> bytes:
    """/a/b/c (dirs), /a/file, /a/link, /a/hl (hard link to /a/file), /z (file of 3 chunks)."""
    file = f(b"file", b"x" * 5000)
    boot, _ = craft(
        d(
            b"",
            d(b"a", d(b"b", d(b"c")), file, hardlink(b"hl", file), ln(b"link", b"../z")),
            f(b"z", b"y" * 9000),
        )
    )
    return boot


def slots(boot: bytes) -> dict[bytes, int]:
    return {name: slot_of(boot, name) for name in (b"a", b"b", b"c", b"file", b"hl", b"link", b"z")}


def walk_all(boot: bytes) -> None:
    img = open_bytes(boot)
    for _, ino in img.walk():
        attr = img.getattr(ino)
        if stat.S_ISREG(attr.mode):
            img.chunks(ino)
        if stat.S_ISDIR(attr.mode):
            img.parent(ino)


def test_crafted_tree_is_valid() -> None:
    boot = tree()
    img = open_bytes(boot)
    got = [p for p, _ in img.walk()]
    assert got == [b"/", b"/a", b"/a/b", b"/a/b/c", b"/a/file", b"/a/hl", b"/a/link", b"/z"]
    walk_all(boot)
    exercise_bounded(boot)


def raises(boot: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        walk_all(boot)


def test_child_dir_with_wrong_parent_is_refused() -> None:
    boot = tree()
    s = slots(boot)
    raises(patch_record(boot, s[b"b"], F_PARENT, "<Q", 1), "records parent 1, not this directory")
    # a file claiming another directory as parent is refused the same way
    raises(patch_record(boot, s[b"z"], F_PARENT, "<Q", s[b"a"]), "records parent")


def test_child_range_pointing_at_ancestor_is_refused() -> None:
    boot = tree()
    s = slots(boot)
    # /a/b/c lists slots starting at /a (its grandparent): a loop if followed
    boot2 = patch_record(boot, s[b"c"], F_CHILD_COUNT, "<I", 1)
    raises(patch_record(boot2, s[b"c"], F_CHILD_INDEX, "<I", s[b"a"]), "children slots")
    # a directory listing itself
    raises(patch_record(boot, s[b"a"], F_CHILD_INDEX, "<I", s[b"a"]), "children slots")
    # the root listing itself
    with pytest.raises(FormatError, match="children slots"):
        open_bytes(patch_record(boot, 1, F_CHILD_INDEX, "<I", 1))


def test_two_directories_sharing_a_child_are_refused() -> None:
    boot = tree()
    s = slots(boot)
    # /a claims /a/b/c as its only child too (a DAG): c's i_parent names /a/b, not /a
    boot2 = patch_record(boot, s[b"a"], F_CHILD_COUNT, "<I", 1)
    raises(patch_record(boot2, s[b"a"], F_CHILD_INDEX, "<I", s[b"c"]), "records parent")


def test_huge_child_count_is_refused_quickly() -> None:
    boot = tree()
    s = slots(boot)
    with deadline(), call_budget(CALL_LIMIT):
        for slot in (s[b"a"], s[b"c"]):
            raises(patch_record(boot, slot, F_CHILD_COUNT, "<I", 0xFFFF_FFFF), "children slots")
        with pytest.raises(FormatError, match="children slots"):
            open_bytes(patch_record(boot, 1, F_CHILD_COUNT, "<I", 0xFFFF_FFFF))
        raises(patch_record(boot, s[b"z"], F_CHILD_COUNT, "<I", 0xFFFF_FFFF), "chunk records run past")
        hole = patch_record(boot, s[b"z"], F_FLAGS, "<Q", V5_INODE_HAS_HOLE)
        raises(patch_record(hole, s[b"z"], F_CHILD_COUNT, "<I", 0xFFFF_FFFF), "chunk records run past")
        raises(patch_record(boot, s[b"z"], F_SIZE, "<Q", 2**63), "chunks for a")


def rename(boot: bytes, slot: int, new: bytes) -> bytes:
    """Overwrite a record's name in place (same padded length)."""
    off = record_offset(boot, slot)
    size = struct.unpack_from("<H", boot, off + F_NAME_SIZE)[0]
    assert len(new) <= (size + 7) & ~7
    out = bytearray(patch_record(boot, slot, F_NAME_SIZE, "<H", len(new)))
    out[off + 128 : off + 128 + len(new)] = new
    return bytes(out)


@pytest.mark.parametrize("bad", [b"a/b", b"..", b".", b"/", b"x\0y"])
def test_bad_names_are_refused(bad: bytes) -> None:
    boot = tree()
    raises(rename(boot, slots(boot)[b"link"], bad), "invalid file name")


def test_name_sizes_out_of_range() -> None:
    boot = tree()
    s = slots(boot)
    raises(patch_record(boot, s[b"z"], F_NAME_SIZE, "<H", 0), "name size 0")
    raises(patch_record(boot, s[b"z"], F_NAME_SIZE, "<H", 300), "name size 300")
    raises(patch_record(boot, s[b"z"], F_NAME_SIZE, "<H", 0xFFFF), "name size")


def test_unsorted_or_duplicate_children_are_refused() -> None:
    boot = tree()
    s = slots(boot)
    raises(rename(boot, s[b"link"], b"aaaa"), "not sorted")
    raises(rename(boot, s[b"hl"], b"file"), "not sorted")


def test_out_of_range_offsets() -> None:
    boot = tree()
    s = slots(boot)
    itab = struct.unpack_from("<Q", boot, S_ITAB_OFF)[0]
    n = len(boot)
    # inode table entries pointing outside the bootstrap / into the superblock
    raises(patch(boot, itab + 4 * (s[b"z"] - 1), "<I", 0xFFFF_FFFF), "outside the bootstrap")
    raises(patch(boot, itab + 4 * (s[b"z"] - 1), "<I", (n - 64) >> 3), "outside the bootstrap|run past")
    raises(patch(boot, itab + 4 * (s[b"z"] - 1), "<I", 16), "outside the bootstrap")
    # superblock tables outside the buffer, misaligned, overlapping
    for field, fmt, value, msg in [
        (S_ITAB_OFF, "<Q", 2**63, "inode table"),
        (S_ITAB_OFF, "<Q", 8196, "inode table"),
        (S_ITAB_ENTRIES, "<I", 0xFFFF_FFFF, "inode table"),
        (S_ITAB_ENTRIES, "<I", 0, "inode table is empty"),
        (S_BTAB_SIZE, "<I", 0xFFFF_FFF8, "blob table"),
        (S_EXT_ENTRIES, "<I", 0xFFFF_FFFF, "extended blob table"),
        (S_PTAB_ENTRIES, "<I", 0xFFFF_FFFF, "prefetch table"),
    ]:
        with pytest.raises(FormatError, match=msg):
            open_bytes(patch(boot, field, fmt, value))
    with pytest.raises(FormatError, match="prefetch table .* overlaps|inode table .* overlaps prefetch"):
        open_bytes(patch(patch(boot, S_PTAB_ENTRIES, "<I", 2), S_PTAB_OFF, "<Q", 8192))
    # inode numbers and parents outside the table
    raises(patch_record(boot, s[b"z"], F_INO, "<Q", 0), "i_ino 0")
    raises(patch_record(boot, s[b"z"], F_INO, "<Q", 2**64 - 1), "i_ino")
    raises(patch_record(boot, s[b"z"], F_PARENT, "<Q", 10**9), "parent inode")
    raises(patch_record(boot, s[b"z"], F_NLINK, "<I", 0), "i_nlink is 0")
    raises(patch_record(boot, s[b"link"], F_SYMLINK_SIZE, "<H", 0), "symlink without a target")
    raises(patch_record(boot, s[b"link"], F_SYMLINK_SIZE, "<H", 0xFFFF), "run past")
    raises(patch_record(boot, s[b"z"], F_MODE, "<I", 0o070644), "unknown file type")


def test_hard_link_consistency() -> None:
    boot = tree()
    s = slots(boot)
    # the hard link points at a directory's slot
    raises(patch_record(boot, s[b"hl"], F_INO, "<Q", s[b"b"]), "hard link to inode")
    # a directory record claiming another inode number
    raises(patch_record(boot, s[b"c"], F_INO, "<Q", s[b"file"]), "directories cannot be hard links")
    img = open_bytes(boot)
    with pytest.raises(FormatError, match="is a hard link to inode"):
        img.getattr(s[b"hl"])


def test_chunk_record_corruption() -> None:
    boot = tree()
    s = slots(boot)
    chunk0 = record_offset(boot, s[b"z"]) + 128 + 8  # name "z" padded to 8
    for off, fmt, value, msg in [
        (32, "<I", 1, "refers to blob 1"),
        (36, "<I", 0x100, "unsupported flags"),
        (36, "<I", 0x8, "unsupported flags"),
        (44, "<I", 0, "uncompressed size 0"),
        (44, "<I", 4097, "uncompressed size 4097"),
        (40, "<I", 0xFFFF_FFFF, "implausible compressed size"),
        (64, "<Q", 7, "file offset 7"),
    ]:
        raises(patch(boot, chunk0 + off, fmt, value), msg)
    # HAS_HOLE chunks out of order
    hole = patch_record(boot, s[b"z"], F_FLAGS, "<Q", V5_INODE_HAS_HOLE)
    img = open_bytes(hole)
    assert [c.file_offset for c in img.chunks(s[b"z"])] == [0, 4096, 8192]
    raises(patch(hole, chunk0 + 80 + 64, "<Q", 0), "overlaps or precedes")


@pytest.mark.parametrize(
    "field,fmt,value,msg",
    [
        (S_SB_SIZE, "<I", 4096, "s_sb_size"),
        (S_BLOCK_SIZE, "<I", 4095, "chunk size"),
        (S_BLOCK_SIZE, "<I", 2048, "chunk size"),
        (S_BLOCK_SIZE, "<I", 32 << 20, "chunk size"),
        (S_FLAGS, "<Q", 1 << 40, "unknown flag bits"),
        (S_FLAGS, "<Q", 0x400, "unknown flag bits"),
        (0, "<I", 0x12345678, "not a RAFS bootstrap"),
    ],
)
def test_superblock_validation(field: int, fmt: str, value: int, msg: str) -> None:
    with pytest.raises(FormatError, match=msg):
        open_bytes(patch(tree(), field, fmt, value))


def test_length_must_be_multiple_of_8() -> None:
    boot = tree()
    with pytest.raises(FormatError, match="multiple of 8"):
        open_bytes(boot + b"\0")
    with pytest.raises(FormatError, match="too short"):
        open_bytes(boot[:8192])
