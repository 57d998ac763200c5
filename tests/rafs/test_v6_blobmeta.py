"""Blob trailers: tar headers, ToC, blob.meta, blob.digest, inlined bootstrap, cross-checks."""

import contextlib
import hashlib
import io
import struct
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nydus_py.rafs import blobmeta as bm
from nydus_py.rafs import layout_blob as lb
from nydus_py.rafs.constants import BlobFeatures, Compressor
from nydus_py.rafs.errors import FormatError
from nydus_py.rafs.model import ChunkInfo
from nydus_py.rafs.v6 import V6Image

from .v6_encode import Built, d, encode, f, link
from .walk import exercise

TREE = d({b"a": f(b"A" * 10000), b"b": f(b"hello"), b"c": f(b"A" * 10000), b"l": link(b"a"), b"s": d({b"x": f(b"xx")})})


@pytest.fixture(scope="module")
def built() -> Built:
    return encode(TREE, chunk_size=0x1000)


def records(img: V6Image) -> list[ChunkInfo]:
    return [img.chunk_record(i) for i in range(img.chunk_table_len())]


def test_tar_header_roundtrip_and_python_tarfile_agree() -> None:
    for name, size in (("blob.meta", 4128), ("rafs.blob.toc", 0), ("image.boot", 8**11 + 5)):
        raw = lb.tar_header(name, size)
        assert len(raw) == 512
        assert lb.parse_tar_header(raw) == lb.TarHeader(name, size)
        if size < 8**11:
            info = tarfile.TarInfo.frombuf(raw, "utf-8", "strict")
            assert (info.name, info.size, info.type) == (name, size, tarfile.REGTYPE)
    bad = bytearray(lb.tar_header("x", 10))
    bad[0] = ord("y")
    with pytest.raises(FormatError, match="checksum"):
        lb.parse_tar_header(bytes(bad))
    with pytest.raises(FormatError, match="magic"):
        lb.parse_tar_header(b"\0" * 512)
    # a header made by Python's tarfile (ustar, not GNU) parses too
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        t.addfile(tarfile.TarInfo("image.boot"), io.BytesIO(b""))
    assert lb.parse_tar_header(buf.getvalue()[:512]) == lb.TarHeader("image.boot", 0)


def test_sections_and_toc(built: Built) -> None:
    img = V6Image(built.bootstrap)
    blob = img.blobs[0]
    secs = bm.list_sections(built.blob)
    assert [s.name for s in secs] == ["image.blob", "blob.meta", "blob.digest", "rafs.blob.toc"]
    assert secs[0].offset == 0 and secs[-1].offset + secs[-1].size + 512 == len(built.blob)
    assert secs[1].offset == blob.ci_offset and secs[1].size == blob.ci_compressed_size + 4096
    toc = bm.read_toc(built.blob, blob)
    assert [e.name for e in toc] == ["blob.meta", "blob.meta.header", "blob.digest"]
    for e in toc:
        data = bm.toc_entry_data(built.blob, e)
        assert hashlib.sha256(data).digest() == e.uncompressed_digest
    bad = bytearray(built.blob)
    bad[-600] ^= 1  # inside the ToC entries
    with pytest.raises(FormatError, match="digest"):
        bm.read_toc(bytes(bad), blob)
    bad_section = bytearray(built.blob)
    bad_section[toc[2].compressed_offset] ^= 1
    with pytest.raises(FormatError, match="sha256"):
        bm.toc_entry_data(bytes(bad_section), toc[2])


@pytest.mark.parametrize("ci", [Compressor.NONE, Compressor.ZSTD, Compressor.LZ4_BLOCK])
def test_blob_meta_matches_chunk_table(ci: Compressor) -> None:
    b = encode(TREE, chunk_size=0x1000, ci_compressor=ci)
    img = V6Image(b.bootstrap)
    blob = img.blobs[0]
    assert blob.ci_compressor == ci
    header, table = bm.read_blob_meta(b.blob, blob)
    assert header.ci_entries == len(table) == blob.chunk_count == img.chunk_table_len()
    assert not header.features & BlobFeatures.CHUNK_INFO_V2
    table.check(blob)
    digests = bm.read_blob_digests(b.blob, blob)
    assert digests is not None and len(digests) == blob.chunk_count
    assert bm.cross_check_chunks(records(img), blob, table, digests) == img.chunk_table_len()


def test_cross_check_catches_disagreement(built: Built) -> None:
    img = V6Image(built.bootstrap)
    blob = img.blobs[0]
    _h, table = bm.read_blob_meta(built.blob, blob)
    digests = bm.read_blob_digests(built.blob, blob)
    assert digests is not None
    recs = records(img)
    moved = [recs[0]._replace(compressed_offset=recs[0].compressed_offset + 1)] + recs[1:]
    with pytest.raises(FormatError, match="blob.meta"):
        bm.cross_check_chunks(moved, blob, table, digests)
    wrong = [recs[0]._replace(digest=b"\1" * 32)] + recs[1:]
    with pytest.raises(FormatError, match="blob.digest"):
        bm.cross_check_chunks(wrong, blob, table, digests)
    with pytest.raises(FormatError, match="out of range"):
        bm.cross_check_chunks([recs[0]._replace(index=10**6)], blob, table)


def test_blob_meta_header_checks(built: Built) -> None:
    img = V6Image(built.bootstrap)
    blob = img.blobs[0]
    hdr_off = blob.ci_offset + blob.ci_compressed_size
    for at, value in ((0, 1), (4092, 1), (12, 99), (8, 7)):
        bad = bytearray(built.blob)
        struct.pack_into("<I", bad, hdr_off + at, value)
        with pytest.raises(FormatError):
            bm.read_blob_meta(bytes(bad), blob)
    with pytest.raises(FormatError, match="outside"):
        bm.read_blob_meta(built.blob[:hdr_off + 100], blob)


@given(
    c_off=st.integers(0, 2**40 - 1),
    c_size=st.integers(1, 2**24),
    u_blk=st.integers(0, 2**32 - 1),
    u_size=st.integers(1, 2**24),
)
@settings(max_examples=200, deadline=None)
def test_v1_entry_roundtrip(c_off: int, c_size: int, u_blk: int, u_size: int) -> None:
    e = bm.decode_v1(lb.pack_ci_v1(c_off, c_size, u_blk << 12, u_size))
    assert (e.compressed_offset, e.compressed_size, e.uncompressed_offset, e.uncompressed_size) == (
        c_off,
        c_size,
        u_blk << 12,
        u_size,
    )
    assert e.compressed == (c_size != u_size)


def test_v2_entry_decode() -> None:
    uncomp = (0x12345) | ((5000 - 1) << 32) | ((0x1 | 0x10) << 56)
    comp = 777 | (1234 << 40)
    raw = struct.pack("<QQQ", uncomp, comp, 0xDEADBEEF)
    e = bm.decode_v2(raw)
    assert (e.compressed_offset, e.compressed_size, e.uncompressed_offset, e.uncompressed_size) == (
        777,
        1234,
        0x12345 << 12,
        5000,
    )
    assert e.compressed and e.crc32 == 0xDEADBEEF
    with pytest.raises(FormatError, match="flags"):
        bm.decode_v2(struct.pack("<QQQ", 0x40 << 56, 0, 0))
    table = bm.ChunkInfoTable(raw * 2, 2, v2=True)
    assert len(table) == 2 and table[1] == e


@pytest.mark.parametrize("toc", [True, False])
def test_inline_bootstrap(toc: bool) -> None:
    b = encode(TREE, chunk_size=0x1000, inline_bootstrap=True, toc=toc, blob_id="c" * 64)
    boot = bm.extract_inline_bootstrap(b.blob)
    assert boot == b.bootstrap
    img = V6Image(boot)
    assert img.blobs[0].features & BlobFeatures.INLINED_FS_META
    assert img.blobs[0].compressed_size < len(b.blob)  # size before image.boot / ToC
    assert exercise(img, b.blob) == len(b.nids)
    names = [s.name for s in bm.list_sections(b.blob)]
    assert names[-2:] == (["image.boot", "rafs.blob.toc"] if toc else ["blob.digest", "image.boot"])
    # the blob's own meta is still readable from it
    _h, table = bm.read_blob_meta(b.blob, img.blobs[0])
    assert bm.cross_check_chunks(records(img), img.blobs[0], table) == img.chunk_table_len()


def test_inline_bootstrap_errors(built: Built) -> None:
    with pytest.raises(FormatError, match="no image.boot"):
        bm.extract_inline_bootstrap(built.blob)
    b = encode(TREE, chunk_size=0x1000, inline_bootstrap=True, toc=True, blob_id="c" * 64)
    toc = bm.parse_toc(b.blob[-(512 + 128 * 4) :])
    boot_entry = next(e for e in toc if e.name == "image.boot")
    with pytest.raises(FormatError, match="exceeds limit"):
        bm.extract_inline_bootstrap(b.blob, max_size=boot_entry.uncompressed_size - 1)
    bad = bytearray(b.blob)
    bad[boot_entry.compressed_offset + boot_entry.compressed_size // 2] ^= 0xFF
    with pytest.raises(FormatError):
        bm.extract_inline_bootstrap(bytes(bad))
    with pytest.raises(FormatError):
        bm.extract_inline_bootstrap(b"short")


def test_no_digest_array_when_feature_clear() -> None:
    b = encode(TREE, chunk_size=0x1000, blob_digest=False, toc=False)
    img = V6Image(b.bootstrap)
    assert bm.read_blob_digests(b.blob, img.blobs[0]) is None
    assert [s.name for s in bm.list_sections(b.blob)] == ["image.blob", "blob.meta"]


def test_list_sections_stops_at_headerless_data() -> None:
    payload = b"\x07" * 3000
    blob = payload + b"meta" + lb.tar_header("blob.meta", 4)
    assert bm.list_sections(blob) == [bm.Section("blob.meta", 3000, 4)]
    with pytest.raises(FormatError, match="claims"):
        bm.list_sections(b"x" + lb.tar_header("blob.meta", 100))


@settings(max_examples=150, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(1, 6000), st.integers(0, 255)), min_size=1, max_size=4), toc=st.booleans())
def test_mutated_blob_tails_raise_only_format_error(edits: list[tuple[int, int]], toc: bool) -> None:
    b = INLINE_TOC if toc else INLINE_RAW
    blob = bytearray(b.blob)
    for back, value in edits:
        blob[len(blob) - min(back, len(blob))] = value
    img = V6Image(b.bootstrap)
    for fn in (
        lambda: bm.extract_inline_bootstrap(bytes(blob)),
        lambda: bm.list_sections(bytes(blob)),
        lambda: bm.read_toc(bytes(blob)),
        lambda: bm.read_blob_meta(bytes(blob), img.blobs[0]),
        lambda: bm.read_blob_digests(bytes(blob), img.blobs[0]),
    ):
        with contextlib.suppress(FormatError):
            fn()


INLINE_TOC = encode(TREE, chunk_size=0x1000, inline_bootstrap=True, toc=True, blob_id="c" * 64)
INLINE_RAW = encode(TREE, chunk_size=0x1000, inline_bootstrap=True, toc=False, blob_id="c" * 64)


def test_toc_entry_sizes_and_algorithms_are_checked() -> None:
    import tracemalloc

    import zstandard

    payload = zstandard.ZstdCompressor(write_content_size=False).compress(b"boot" * 100)
    blob = payload + b"\0" * 100
    lying = bm.TocEntry(lb.TOC_ZSTD, "image.boot", b"\0" * 32, 0, len(payload), 3 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="expected"):
            bm.toc_entry_data(blob, lying)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    ok = bm.TocEntry(lb.TOC_ZSTD, "image.boot", hashlib.sha256(b"boot" * 100).digest(), 0, len(payload), 400)
    assert bm.toc_entry_data(blob, ok) == b"boot" * 100
    with pytest.raises(FormatError, match="not supported"):
        bm.toc_entry_data(blob, bm.TocEntry(lb.TOC_LZ4, "x", b"\0" * 32, 0, 4, 4))
    with pytest.raises(FormatError, match="unknown flags"):
        bm.toc_entry_data(blob, bm.TocEntry(0x10, "x", b"\0" * 32, 0, 4, 4))
    with pytest.raises(FormatError, match="outside"):
        bm.toc_entry_data(blob, bm.TocEntry(lb.TOC_NONE, "x", b"\0" * 32, 10**9, 4, 4))
