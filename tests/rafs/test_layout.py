"""The on-disk layout modules: records, their views and offsets, and the rule that only they
spell out struct formats inside nydus_py/rafs and nydus_py/builder (issue 11)."""

import ast
from pathlib import Path

import pytest

from nydus_py.rafs import blobmeta, layout_blob, layout_common, layout_v5, layout_v6
from nydus_py.rafs.constants import ChunkFlags
from nydus_py.rafs.layout_common import CHUNK, CHUNK_EXTENT, CHUNK_KEY, Record, pack_chunk, unpack_chunk
from nydus_py.rafs.model import ChunkInfo

from . import v5craft

ROOT = Path(__file__).resolve().parents[2] / "nydus_py"

SAMPLE = ChunkInfo(
    digest=bytes(range(32)),
    blob_index=3,
    flags=ChunkFlags.COMPRESSED | ChunkFlags.HAS_CRC32,
    compressed_offset=0x1234_5678_9A,
    compressed_size=777,
    uncompressed_offset=0x7000,
    uncompressed_size=4096,
    file_offset=0x10_0000,
    index=42,
    crc32=0xDEADBEEF,
)


def test_chunk_record_round_trips_and_views_agree_with_it() -> None:
    raw = pack_chunk(SAMPLE)
    assert len(raw) == layout_common.CHUNK_RECORD_SIZE == 80
    assert unpack_chunk(raw, 0) == SAMPLE
    assert unpack_chunk(b"\0" * 5 + raw, 5) == SAMPLE
    assert CHUNK_KEY.unpack(raw) == (SAMPLE.blob_index, SAMPLE.uncompressed_offset, SAMPLE.index)
    assert CHUNK_EXTENT.unpack(raw) == (SAMPLE.uncompressed_size, SAMPLE.file_offset)
    assert CHUNK_KEY.size == CHUNK_EXTENT.size == CHUNK.size


def test_v5_offsets_match_the_test_writers_hand_written_ones() -> None:
    """v5craft states the offsets independently (spec 3.2, 3.6): the records must agree."""
    inode = layout_v5.INODE
    for field, want in [
        ("digest", v5craft.F_DIGEST), ("parent", v5craft.F_PARENT), ("ino", v5craft.F_INO),
        ("uid", v5craft.F_UID), ("gid", v5craft.F_GID), ("mode", v5craft.F_MODE), ("size", v5craft.F_SIZE),
        ("blocks", v5craft.F_BLOCKS), ("flags", v5craft.F_FLAGS), ("nlink", v5craft.F_NLINK),
        ("child_index", v5craft.F_CHILD_INDEX), ("child_count", v5craft.F_CHILD_COUNT),
        ("name_size", v5craft.F_NAME_SIZE), ("symlink_size", v5craft.F_SYMLINK_SIZE),
    ]:  # fmt: skip
        assert inode.offset(field) == want, field
    sb = layout_v5.SUPERBLOCK
    for field, want in [
        ("sb_size", v5craft.S_SB_SIZE), ("block_size", v5craft.S_BLOCK_SIZE), ("flags", v5craft.S_FLAGS),
        ("inodes_count", v5craft.S_INODES_COUNT), ("inode_table_offset", v5craft.S_ITAB_OFF),
        ("prefetch_table_offset", v5craft.S_PTAB_OFF), ("blob_table_offset", v5craft.S_BTAB_OFF),
        ("inode_table_entries", v5craft.S_ITAB_ENTRIES), ("prefetch_table_entries", v5craft.S_PTAB_ENTRIES),
        ("blob_table_size", v5craft.S_BTAB_SIZE), ("extended_blob_table_entries", v5craft.S_EXT_ENTRIES),
        ("extended_blob_table_offset", v5craft.S_EXT_OFF),
    ]:  # fmt: skip
        assert sb.offset(field) == want, field
    assert layout_v5.INODE_INO_OFFSET == v5craft.F_INO


def test_v5_inode_body_view_skips_only_the_digest() -> None:
    values = [b"D" * 32, 1, 2, 3, 4, 5, 0o100644, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    raw = layout_v5.INODE.pack(*values)
    assert layout_v5.INODE_BODY.unpack(raw) == tuple(values[1:])


def test_v6_records_have_the_erofs_offsets() -> None:
    """Offsets from linux/fs/erofs/erofs_fs.h and nydus rafs/src/metadata/layout/v6.rs."""
    sb = layout_v6.SUPERBLOCK
    assert (sb.offset("root_nid"), sb.offset("meta_blkaddr"), sb.offset("feature_incompat")) == (14, 40, 80)
    assert (sb.offset("extra_devices"), sb.offset("devt_slotoff")) == (86, 88)
    ext = layout_v6.EXT_SUPERBLOCK
    assert (ext.offset("chunk_size"), ext.offset("chunk_table_offset"), ext.offset("prefetch_table_size")) == (
        20, 24, 48,
    )  # fmt: skip
    blob = layout_v6.BLOB_ENTRY
    assert (blob.offset("blob_toc_size"), blob.offset("blob_toc_digest"), blob.offset("cipher_algo")) == (104, 136, 216)
    assert layout_v6.EXTENDED_INODE.offset("mtime") == 32 and layout_v6.COMPACT_INODE.offset("ino") == 20
    assert layout_v6.DIRENT_NAMEOFF.unpack(layout_v6.DIRENT.pack(7, 300, 2)) == (300,)
    assert layout_v6.XATTR_IBODY_HEADER.offset("shared_count") == 4


def test_blob_meta_header_carries_its_magic_at_both_ends() -> None:
    raw = layout_blob.pack_blob_meta_header(0x4000_0001, 3, 10, 4096, 100, 160)
    assert len(raw) == layout_blob.BLOB_META_HEADER_SIZE == 4096
    assert raw[:4] == raw[-4:] == layout_blob.BLOB_META_MAGIC.to_bytes(4, "little")
    header = blobmeta.parse_blob_meta_header(raw)
    assert (header.ci_entries, header.ci_offset, header.ci_compressed_size, header.ci_uncompressed_size) == (
        10, 4096, 100, 160,
    )  # fmt: skip


def test_toc_entry_layout() -> None:
    raw = layout_blob.pack_toc_entry("blob.digest", layout_blob.Compressor.ZSTD, b"\1" * 32, 5, 6, 7)
    assert len(raw) == layout_blob.TOC_ENTRY_SIZE
    assert layout_blob.TOC_ENTRY.unpack_dict(raw) == {
        "flags": layout_blob.TOC_ZSTD,
        "name": b"blob.digest".ljust(16, b"\0"),
        "uncompressed_digest": b"\1" * 32,
        "compressed_offset": 5,
        "compressed_size": 6,
        "uncompressed_size": 7,
    }


def test_record_refuses_ill_formed_definitions() -> None:
    with pytest.raises(ValueError, match="padding"):
        Record("bad", ("a", "4x"))
    with pytest.raises(ValueError, match="padding"):
        Record("bad", ("", "I"))
    rec = Record("r", ("a", "I"), ("", "4x"), ("b", "Q"))
    assert rec.size == 16 and rec.offset("b") == 8
    with pytest.raises(KeyError):
        rec.offset("c")
    with pytest.raises(KeyError):
        rec.view("b", "a")  # not in record order
    with pytest.raises(KeyError):
        rec.view("a", "c")
    assert rec.view("b").unpack(rec.pack(1, 2)) == (2,)


def _struct_calls(path: Path) -> list[str]:
    """`struct.<anything>(...)` calls in a module: where a format string would be spelled out."""
    tree = ast.parse(path.read_text())
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "struct"
    ]


def test_only_the_layout_modules_spell_out_struct_formats() -> None:
    """Readers and writers take every record from rafs/layout_*.py, so each is written once."""
    offenders = [
        call
        for package in ("rafs", "builder")
        for path in sorted((ROOT / package).glob("*.py"))
        if not path.name.startswith("layout_")
        for call in _struct_calls(path)
    ]
    assert offenders == []
    assert _struct_calls(ROOT / "rafs" / "layout_common.py")  # the scan does see calls
